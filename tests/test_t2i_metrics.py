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
import gzip
import json

import numpy as np
import pytest
import torch

from clip_bytes import bytes_to_unicode

pytest.importorskip("open_clip")
pytest.importorskip("transformers")

from epd.rewards import load_reward  # noqa: E402
from epd.rewards.t2i import SCORERS, MissingWeightsError, load_scorer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore::UserWarning")

PROMPTS = ["a red fox in the snow", "a bowl of soup", "an astronaut riding a horse", "a city at night"]
IMG = 32   # tiny image side of every tiny model
TOL = 1e-4


def images(n: int = 4, seed: int = 0, size: int = 48) -> torch.Tensor:
    """Random pixels in [0, 1], [n, 3, size, size] (not the model's size: the preprocessing resizes)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


# --- tiny models in their release layouts ------------------------------------------------------------------------

def clip_tokenizer_files(folder) -> None:
    """CLIP's tokenizer (vocabulary 49408) as vocab.json + merges.txt, from open_clip's bundled BPE merges."""
    from open_clip.tokenizer import default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    chars = bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def tiny_clip_config():
    from transformers import CLIPConfig

    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                max_position_embeddings=77)
    vision = dict(image_size=IMG, patch_size=8, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                  num_hidden_layers=2)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)  # 64: one MPS head of 64


def save_clip_processor(folder) -> None:
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    clip_tokenizer_files(folder / "_tok")
    tok = CLIPTokenizer(str(folder / "_tok" / "vocab.json"), str(folder / "_tok" / "merges.txt"))
    proc = CLIPImageProcessor(size={"shortest_edge": IMG}, crop_size={"height": IMG, "width": IMG})
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(folder)


def save_clip(folder, seed: int) -> None:
    from transformers import CLIPModel

    torch.manual_seed(seed)
    CLIPModel(tiny_clip_config()).save_pretrained(folder)
    save_clip_processor(folder)


def save_hpsv2(tmp) -> tuple:
    import open_clip

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": IMG, "layers": 2, "width": 64, "head_width": 32,
                                           "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (tmp / "epd-tiny-ViT.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp / "epd-tiny-ViT.json")
    torch.manual_seed(1)
    model = open_clip.create_model("epd-tiny-ViT", pretrained=None)
    # HPSv2's checkpoints nest the state dict as {"state_dict": ...}
    torch.save({"state_dict": model.state_dict()}, tmp / "HPS_v2.1_compressed.pt")
    return tmp / "HPS_v2.1_compressed.pt", "epd-tiny-ViT"


BLIP_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=IMG,
                   patch_size=16)
MED = dict(vocab_size=0, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
           hidden_act="gelu", max_position_embeddings=64, layer_norm_eps=1e-12, pad_token_id=0,
           add_cross_attention=True, encoder_width=32)
WORDS = ["a", "an", "the", "red", "fox", "in", "snow", "bowl", "of", "soup", "astronaut", "riding", "horse", "city",
         "at", "night"]


def to_release_keys(state: dict) -> dict:
    """Our ImageReward keys → the release's (BLIP's timm ViT names), written independently of the loader's map."""
    out = {}
    for k, v in state.items():
        if k.startswith("vision."):
            k = k[len("vision."):]
            k = (k.replace("embeddings.class_embedding", "cls_token")
                  .replace("embeddings.position_embedding", "pos_embed")
                  .replace("embeddings.patch_embedding.", "patch_embed.proj.")
                  .replace("encoder.layers.", "blocks.").replace("layer_norm1", "norm1")
                  .replace("layer_norm2", "norm2").replace("self_attn.qkv", "attn.qkv")
                  .replace("self_attn.projection", "attn.proj").replace("post_layernorm.", "norm."))
            out["blip.visual_encoder." + k] = v
        elif k.startswith("text."):
            out["blip.text_encoder." + k[len("text."):]] = v
        else:
            out[k] = v
    # present in the release, unused by the score
    out["blip.text_encoder.embeddings.position_ids"] = torch.arange(64)[None]
    out["blip.vision_proj.weight"] = torch.zeros(256, 32)
    out["blip.text_proj.weight"] = torch.zeros(256, 32)
    return out


def save_imagereward(folder):
    from epd.rewards.t2i.imagereward import ImageRewardModel

    folder.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    med = {**MED, "vocab_size": len(vocab) + 2}   # + BLIP's [DEC] and [ENC]
    (folder / "med_config.json").write_text(json.dumps(med))
    (folder / "vision_config.json").write_text(json.dumps(BLIP_VISION))
    torch.manual_seed(2)
    model = ImageRewardModel(med, BLIP_VISION)
    torch.save(to_release_keys(model.state_dict()), folder / "ImageReward.pt")
    return folder


def save_mps(tmp):
    """The release ships MPS as a whole pickled model (torch.save(model)); so does this fixture."""
    from epd.rewards.t2i.mps import MPSModel

    torch.manual_seed(3)
    model = MPSModel(tiny_clip_config())
    torch.save(model, tmp / "MPS_overall_checkpoint.pth")
    return tmp / "MPS_overall_checkpoint.pth", model.state_dict()


def save_aesthetic(path):
    from epd.rewards.t2i.common import LinearHead

    torch.manual_seed(4)
    head = LinearHead(64)
    torch.save(head.state_dict(), path)
    return path


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
    from epd.rewards.t2i.common import load_checkpoint

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
    from epd.pickled import pickled_module_state_dict
    from epd.rewards.t2i.common import load_checkpoint

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


def _random_inception():
    """FeatureExtractorInceptionV3's architecture with its random initialisation: its constructor loads weights
    (from a download when given no path), so the load is stubbed out for this one construction."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    class Random(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, state, strict=True):   # keep the random initialisation
            return None

    real = fe.torch.load
    fe.torch.load = lambda *a, **k: {}
    try:
        return Random("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    finally:
        fe.torch.load = real
