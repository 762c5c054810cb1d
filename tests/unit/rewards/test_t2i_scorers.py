"""The six text-to-image scorers and FID, on tiny random models of the released architectures (no download).

Each tiny model is built here from a config (open_clip ViT for HPSv2; transformers CLIP for PickScore, CLIP score,
the aesthetic predictor and MPS; transformers BLIP for ImageReward), written to tmp_path in the layout its
release ships (state dicts, ``save_pretrained`` folders, MPS's whole pickled model) and loaded through the same
loaders users call. The CLIP tokenizers are the real CLIP BPE, built from the vocabulary open_clip bundles.

Oracles: ImageReward's vision tower against timm's ViT (BLIP's ViT is timm's, the checkpoint keys are timm's);
MPS's pickled-model reader against ``state_dict()``; FID against the closed-form Fréchet distance computed with
scipy's ``sqrtm`` (the classic FID formula).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch


pytest.importorskip("open_clip")
pytest.importorskip("transformers")

from epd.rewards import load_reward  # noqa: E402
from epd.rewards.t2i import SCORERS, MissingWeightsError, load_scorer  # noqa: E402
from tiny_t2i import (IMG, PROMPTS, TOL, _random_inception, images, save_aesthetic, save_clip,  # noqa: E402
                      save_clip_processor, save_hpsv2, save_imagereward, save_mps, tiny_clip_config)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore::UserWarning")

@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """Every scorer's weights, in the mapping layout of config's ``evaluate.weights``."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tmp = tmp_path_factory.mktemp("t2i")
    hps, arch = save_hpsv2(tmp)
    save_clip(tmp / "pickscore", seed=5)
    save_clip(tmp / "clip", seed=6)
    save_clip_processor(tmp / "clip_h")
    tiny_clip_config().save_pretrained(tmp / "clip_h")   # MPS builds its CLIP-H from this folder's config.json
    mps, mps_state = save_mps(tmp)
    return {"hpsv2": hps, "pickscore": tmp / "pickscore", "clip": tmp / "clip", "clip_h": tmp / "clip_h",
            "aesthetic": save_aesthetic(tmp / "sac+logos+ava1-l14-linearMSE.pth"),
            "imagereward": save_imagereward(tmp / "imagereward"), "mps": mps,
            "_hps_arch": arch, "_mps_state": mps_state}


def scorer(name, weights, **kw):
    extra = {"model_name": weights["_hps_arch"]} if name == "hpsv2" else {}
    return load_scorer(name, {k: v for k, v in weights.items() if not k.startswith("_")}, device="cpu",
                       **extra, **kw)


# --- every scorer ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SCORERS))
def test_scorer_end_to_end(name, weights):
    """A score per image, finite, within the documented range; batching (and mixing prompts in one batch) does
    not change any image's score; the prompt matters to every scorer but the aesthetic one."""
    s = scorer(name, weights, batch_size=4)
    x = images()
    scores = s.score(x, PROMPTS)
    assert scores.shape == (4,) and scores.dtype == torch.float64
    assert torch.isfinite(scores).all()
    assert s.range[0] <= float(scores.min()) and float(scores.max()) <= s.range[1]
    one_by_one = torch.cat([s.score(x[i:i + 1], PROMPTS[i:i + 1]) for i in range(4)])
    assert torch.allclose(scores, one_by_one, atol=TOL, rtol=TOL)
    assert float((scores[:-1] - scores[1:]).abs().max()) > 1e-6          # images are told apart
    swapped = s.score(x, PROMPTS[::-1])
    if name == "aesthetic":
        assert torch.allclose(scores, swapped, atol=1e-9)
    else:
        assert float((scores - swapped).abs().max()) > 1e-6
    uint8 = s.score((x * 255).round().to(torch.uint8), PROMPTS)          # decode()'s output scores the same
    assert torch.allclose(scores, uint8, atol=1e-9)


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_missing_weights_named(name, weights, tmp_path):
    """A missing weights file (or folder) gives an error naming it and where it comes from."""
    missing = tmp_path / f"no-{name}-here"
    with pytest.raises(MissingWeightsError, match=str(missing).replace("+", r"\+")) as err:
        scorer(name, {**weights, name: missing})
    assert "http" in str(err.value)


def test_missing_file_inside_folder_named(weights, tmp_path):
    import shutil

    folder = tmp_path / "ir"
    shutil.copytree(weights["imagereward"], folder)
    (folder / "med_config.json").unlink()
    with pytest.raises(MissingWeightsError, match="med_config.json"):
        scorer("imagereward", {**weights, "imagereward": folder})


def test_pixels_out_of_range_refused(weights):
    s = scorer("clip", weights)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        s.score(images() * 2 - 1, PROMPTS)
    with pytest.raises(ValueError, match="one prompt per image"):
        s.score(images(), PROMPTS[:2])


def test_registry_and_weighted_mix(weights):
    """load_reward reaches the scorers by name, and a {name: weight} mix of them is the weighted sum."""
    paths = {k: v for k, v in weights.items() if not k.startswith("_")}
    x = images()
    clip = load_reward("clip", weights=paths["clip"], device="cpu")
    aes = load_reward("aesthetic", weights=paths, device="cpu")
    mix = load_reward({"clip": 1.0, "aesthetic": -0.5}, weights=paths, device="cpu")
    want = clip.score(x, PROMPTS) - 0.5 * aes.score(x, PROMPTS)
    assert torch.allclose(mix.score(x, PROMPTS), want, atol=1e-9)


# --- released-architecture checks ---------------------------------------------------------------------------------

def test_imagereward_vision_tower_is_blips_timm_vit(weights):
    """The checkpoint's BLIP ViT (timm's VisionTransformer, keys as released) and our renamed transformers tower
    give the same image states."""
    timm = pytest.importorskip("timm")
    from epd.io import load_checkpoint

    state = load_checkpoint(weights["imagereward"] / "ImageReward.pt", "imagereward")
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=IMG, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, qkv_bias=True,
        num_classes=0, global_pool="", norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
    prefix = "blip.visual_encoder."
    vit.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    ours = scorer("imagereward", weights).model.vision
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(x), ours(pixel_values=x).last_hidden_state, atol=1e-5)


def test_mps_pickled_model_read_without_running_it(weights, tmp_path):
    """The whole-model pickle gives exactly the module's state dict (epd.pickled, whose own tests check that code
    hidden in a pickle does not run); the weights_only loader refuses it by name."""
    from epd.io import load_checkpoint
    from epd.pickled import pickled_module_state_dict

    got = pickled_module_state_dict(weights["mps"])
    want = {k: v for k, v in weights["_mps_state"].items()}
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(weights["mps"], "x")


# --- FID ---------------------------------------------------------------------------------------------------------

def _closed_form(mu1, s1, mu2, s2) -> float:
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _features_with_stats(mu, cov, n, seed):
    """n samples whose sample mean and (unbiased) covariance are exactly mu and cov."""
    z = np.random.default_rng(seed).standard_normal((n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T   # sample covariance exactly I
    return mu + z @ np.linalg.cholesky(cov).T


def test_fid_on_synthetic_features_equals_closed_form(tmp_path):
    from epd.metrics.fid import fid_from_features, load_reference_stats, save_reference_stats

    rng = np.random.default_rng(0)
    d = 16
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = a @ a.T / d + 0.1 * np.eye(d), b @ b.T / d + 0.1 * np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    ref = save_reference_stats(_features_with_stats(mu2, s2, 500, 1), tmp_path / "ref.npz")
    value = fid_from_features(_features_with_stats(mu1, s1, 300, 2), load_reference_stats(ref))
    assert value == pytest.approx(_closed_form(mu1, s1, mu2, s2), rel=1e-8)
    assert value > 1.0
    same = fid_from_features(_features_with_stats(mu2, s2, 300, 3), load_reference_stats(ref))
    assert abs(same) < 1e-8


def test_fid_reference_stats_refused(tmp_path):
    from epd.metrics.fid import load_reference_stats

    with pytest.raises(FileNotFoundError, match="missing"):
        load_reference_stats(tmp_path / "nope.npz")
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="sigma"):
        load_reference_stats(tmp_path / "bad.npz")
    np.savez(tmp_path / "obj.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.zeros((1, 1)))
    with pytest.raises(ValueError, match="pickled or corrupt"):
        load_reference_stats(tmp_path / "obj.npz")


def test_fid_inception_from_local_file(tmp_path):
    """torch-fidelity's Inception-v3 built from a local state dict (read with weights_only=True): 2048-d features;
    a missing file is named."""
    pytest.importorskip("torch_fidelity")
    from epd.metrics.fid import inception_features, load_inception

    with pytest.raises(MissingWeightsError, match="inception.pth"):
        load_inception(tmp_path / "inception.pth")
    # a random-initialised copy of the architecture, saved as a state dict (the real file is one too)
    torch.manual_seed(0)
    net = _random_inception()
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    model = load_inception(tmp_path / "inception.pth")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), net.state_dict().values()))
    x = (torch.rand(3, 3, 40, 40) * 255).to(torch.uint8)
    feats = inception_features([x[:2], x[2:]], model)
    assert feats.shape == (3, 2048) and torch.isfinite(feats).all()
