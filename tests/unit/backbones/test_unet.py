"""``unet-digits`` (``epd.backbones.UNetDigits``): the shipped weights and their provenance, each refusal of a bad
weight file with its own message, the denoiser protocol (per-row σ, dtypes, guidance in one batched call, EDM's
limits), the training command, and sample quality in FD-digits against the held-out data's own."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from epd import schedules
from epd.backbones import BACKBONES, CallCounter, UNetDigits, load_backbone
from epd.backbones.unet import EDMDenoiser, UNetConfig, load_unet
from epd.cli import main as cli
from epd.data import WEIGHTS_DIR, digit_split
from epd.io import WeightsError
from epd.metrics.digits import label_accuracy
from epd.solvers import sample_dpmpp_3m

STEM = WEIGHTS_DIR / "unet-digits"


@pytest.fixture(scope="module")
def unet():
    return UNetDigits()




def edit_json(path: Path, fn) -> None:
    h = json.loads(path.read_text())
    fn(h)
    path.write_text(json.dumps(h))


# ------------------------------------------------------------------------------------------------------ shipped weights
def test_shipped_files_and_provenance(unet):
    st, js, log = (STEM.with_name(STEM.name + s) for s in (".safetensors", ".json", ".log.csv"))
    assert st.stat().st_size <= 10 * 2**20
    h = json.loads(js.read_text())
    assert h["kind"] == "unet-digits" and h["tensors_sha256"] == hashlib.sha256(st.read_bytes()).hexdigest()
    prov = h["provenance"]
    assert prov["command"].startswith("epd train-backbone --what unet")
    assert prov["data"] == digit_split().describe()
    assert prov["train_seconds"] <= 20 * 60
    for key in ("fd_digits_held_out_vs_train", "fd_digits_conditional_vs_train", "fd_digits_unconditional_vs_train"):
        assert key in prov["metrics"]
    rows = list(csv.DictReader(log.open()))
    assert {"step", "loss", "lr"} <= set(rows[0]) and int(rows[-1]["step"]) == prov["training"]["steps"]
    assert float(rows[-1]["loss"]) == pytest.approx(prov["final_loss"])
    assert float(rows[-1]["loss"]) < 0.5 * float(rows[0]["loss"])
    n = sum(p.numel() for p in unet.model.parameters())
    assert n == prov["parameters"] and n * 4 <= 10 * 2**20
    # centred by the train split's mean image, σ_data the std of the centred train pixels
    train = digit_split().train_images.float()
    assert torch.allclose(unet.data_mean, train.mean(0), atol=1e-6)
    assert unet.model.cfg.sigma_data == pytest.approx(float((train - train.mean(0)).std()), abs=1e-3)


def test_registered():
    assert BACKBONES["unet-digits"] is UNetDigits
    b = load_backbone("unet-digits", guidance=2.0)
    assert b.name == "unet-digits" and b.shape == (1, 8, 8) and b.guidance == 2.0
    assert (b.sigma_min, b.sigma_max) == (0.002, 80.0)


# ------------------------------------------------------------------------------------------------------------ refusals
def test_missing_file_names_it_and_the_command(tmp_path):
    with pytest.raises(WeightsError, match=r"weights file missing: .*nothing\.json\. Make it with "
                                           r"`epd train-backbone --what unet`"):
        UNetDigits(tmp_path / "nothing")
    (tmp_path / "half.json").write_text("{}")
    with pytest.raises(WeightsError, match=r"weights file missing: .*half\.safetensors"):
        UNetDigits(tmp_path / "half")


def test_truncated_tensors_refused(copy):
    st = copy / "unet-digits.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(WeightsError, match="does not match the checksum in unet-digits.json"):
        UNetDigits(copy / "unet-digits")


def test_corrupt_tensors_with_matching_checksum_refused(copy):
    st = copy / "unet-digits.safetensors"
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    edit_json(copy / "unet-digits.json", lambda h: h.update(tensors_sha256=hashlib.sha256(st.read_bytes()).hexdigest()))
    with pytest.raises(WeightsError, match="is not a readable safetensors file"):
        UNetDigits(copy / "unet-digits")


def test_corrupt_json_refused(copy):
    js = copy / "unet-digits.json"
    js.write_text(js.read_text()[:100])
    with pytest.raises(WeightsError, match="is not valid JSON"):
        UNetDigits(copy / "unet-digits")


def test_classifier_offered_as_unet_refused(copy):
    with pytest.raises(WeightsError, match=r"holds weights of a 'digit-classifier' network, not 'unet-digits'"):
        UNetDigits(copy / "digit-classifier")
    # renamed files do not fool it: the JSON says what they are
    for s in (".safetensors", ".json"):
        os.replace(copy / f"digit-classifier{s}", copy / f"unet-digits{s}")
    with pytest.raises(WeightsError, match="wrong file for this model"):
        UNetDigits(copy / "unet-digits")


@pytest.mark.parametrize("change, message", [
    ({"channels": [48, 64, 64]}, "tensor shapes do not match the architecture"),
    ({"blocks_per_level": 1}, "tensors do not match the architecture in its JSON config: missing .*unexpected"),
    ({"channels": "wide"}, "architecture config is malformed"),
    ({"depth": 3}, "architecture config is malformed"),
])
def test_architecture_mismatch_refused(copy, change, message):
    edit_json(copy / "unet-digits.json", lambda h: h["config"].update(change))
    with pytest.raises(WeightsError, match=message):
        UNetDigits(copy / "unet-digits")


def test_nan_weights_refused(copy):
    from safetensors.torch import load_file, save_file

    st = copy / "unet-digits.safetensors"
    t = load_file(st)
    t["net.conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(t, st)
    edit_json(copy / "unet-digits.json", lambda h: h.update(tensors_sha256=hashlib.sha256(st.read_bytes()).hexdigest()))
    with pytest.raises(WeightsError, match=r"contain NaN or inf"):
        UNetDigits(copy / "unet-digits")


def test_pickle_refused(copy, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    torch.save({"w": torch.zeros(2)}, copy / "unet-digits.safetensors")
    with pytest.raises(WeightsError, match=r"is a pickle \(torch\.save / pickle\.dump\)\. epd never unpickles"):
        UNetDigits(copy / "unet-digits")


# ---------------------------------------------------------------------------------------------------- denoiser protocol
def test_per_row_sigma_and_labels(unet):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 8, 8, generator=g) * 3
    sigma = torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0, 80.0])
    cond = torch.tensor([0, 3, -1, 9, 5, -1])
    out = unet(x, sigma, cond)
    rows = torch.cat([unet(x[i:i + 1], sigma[i:i + 1], cond[i:i + 1]) for i in range(6)])
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.allclose(out, rows, atol=1e-5)
    assert unet(x.double(), sigma.double(), cond).dtype == torch.float64
    assert torch.equal(unet(x, sigma, None), unet(x, sigma, torch.full((6,), -1)))
    with pytest.raises(ValueError, match="one value per row"):
        unet(x, sigma[:1], cond)
    with pytest.raises(ValueError, match="digits 0-9, or -1"):
        unet(x, sigma, torch.tensor([0, 1, 2, 3, 4, 10]))


def test_edm_limits(unet):
    """c_skip → 1, c_out → 0 as σ → 0: D(x, σ) ≈ x; at σ_max the output is a clean image, not the noisy input."""
    y = (digit_split().held_out_images[:8].float() - unet.data_mean)
    near = unet(y, torch.full((8,), 1e-4), None)
    assert (near - y).abs().max() < 1e-3
    far = unet(80 * torch.randn(8, 1, 8, 8), torch.full((8,), 80.0), None)
    assert far.abs().max() < 3


def test_guidance_is_one_batched_call(unet):
    x = torch.randn(5, 1, 8, 8) * 2
    sigma = torch.full((5,), 1.5)
    cond = torch.tensor([1, 2, -1, 7, 0])
    d_u, d_c = unet(x, sigma, torch.full((5,), -1)), unet(x, sigma, cond)
    guided = UNetDigits(guidance=3.0)
    counter = CallCounter(guided.model)
    guided.model = counter
    out = guided(x, sigma, cond)
    assert counter.calls == 1 and counter.rows == [10]
    expected = d_u + 3.0 * (d_c - d_u)
    expected[2] = d_u[2]          # the null label stays unconditional
    assert torch.allclose(out, expected, atol=1e-5)


def test_encode_pixels_decode(unet):
    assert torch.equal(unet.encode(prompts=["a handwritten 3", "the digit seven", "anything"]),
                       torch.tensor([3, 7, -1]))
    assert torch.equal(unet.encode(labels=[1, 2]), torch.tensor([1, 2]))
    assert unet.encode() is None
    x = torch.randn(4, 1, 8, 8) * 5
    px = unet.to_pixels(x)
    assert px.shape == (4, 1, 8, 8) and px.min() >= 0 and px.max() <= 1
    img = unet.decode(x)
    assert img.dtype == torch.uint8 and img.shape == (4, 8, 8)
    assert torch.equal(img, (px * 255).round().to(torch.uint8).squeeze(1))
    # a held-out digit, centred, comes back as its own pixels
    y = digit_split().held_out_images[:3].float()
    assert torch.allclose(unet.to_pixels(y - unet.data_mean), (y + 1) / 2, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------- training
def test_train_command_writes_valid_reproducible_files(tmp_path, capsys):
    for out in ("a", "b"):
        assert cli(["train-backbone", "--what", "unet", "--steps", "3", "--out", str(tmp_path / out),
                    "--no-metrics", "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "a")) == ["unet-digits.json", "unet-digits.log.csv", "unet-digits.safetensors"]
    model, mean, header = load_unet(tmp_path / "a" / "unet-digits")
    assert isinstance(model, EDMDenoiser) and mean.shape == (1, 8, 8)
    assert header["provenance"]["training"]["steps"] == 3
    assert header["config"] == UNetConfig(sigma_data=header["config"]["sigma_data"]).to_json()
    same = [(tmp_path / d / "unet-digits.safetensors").read_bytes() for d in ("a", "b")]
    assert same[0] == same[1]     # same seed, same thread count: bit-identical
    # the shipped weights differ from a 3-step run, so the training really moved them
    assert json.loads((tmp_path / "a" / "unet-digits.json").read_text())["tensors_sha256"] != \
        json.loads(STEM.with_suffix(".json").read_text())["tensors_sha256"]


def test_sample_command_refuses_missing_weights(tmp_path, capsys):
    assert cli(["sample", "--backbone", "unet-digits", "--weight-file", str(tmp_path / "none"), "--seeds", "0-1",
                "--outdir", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "weights file missing" in err and "epd train-backbone --what unet" in err
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------------------------------- quality
def test_shipped_metrics_within_3x_of_held_out_fd():
    """The FD-digits recorded when the weights were made (2000 samples, DPM-Solver++(3M) with 30 NFE on a logSNR grid,
    labels cycling 0-9 or none); ``test_metrics_reproduce`` (slow) measures them again."""
    m = json.loads(STEM.with_suffix(".json").read_text())["provenance"]["metrics"]
    print(f"FD-digits vs train: held-out {m['fd_digits_held_out_vs_train']:.2f}, unet conditional "
          f"{m['fd_digits_conditional_vs_train']:.2f}, unconditional {m['fd_digits_unconditional_vs_train']:.2f}")
    assert m["solver"] == "dpmpp_3m" and m["nfe"] >= 20 and m["num_samples"] >= 1000
    for mode in ("conditional", "unconditional"):
        assert m[f"fd_digits_{mode}_vs_train"] <= 3 * m["fd_digits_held_out_vs_train"]
    assert m["label_accuracy_conditional"] >= 0.95


def test_few_step_samples_show_their_label(unet):
    labels = torch.arange(300) % 10
    with torch.no_grad():
        x = sample_dpmpp_3m(unet, unet.noise(range(300)), schedules.logsnr(11), cond=labels)
    assert label_accuracy(unet.to_pixels(x), labels) >= 0.9


@pytest.mark.slow
def test_metrics_reproduce():
    """Sample again as ``epd train-backbone`` did after training: same numbers, within 3x of the held-out FD."""
    from epd.train_backbone import unet_metrics

    shipped = json.loads(STEM.with_suffix(".json").read_text())["provenance"]["metrics"]
    m = unet_metrics(STEM)
    print({k: v for k, v in m.items() if k.startswith(("fd", "label"))})
    for key, value in shipped.items():
        assert m[key] == (pytest.approx(value, rel=1e-3) if isinstance(value, float) else value), key
    for mode in ("conditional", "unconditional"):
        assert m[f"fd_digits_{mode}_vs_train"] <= 3 * m["fd_digits_held_out_vs_train"]
