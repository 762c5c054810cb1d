"""``epd sample`` → samples.csv → ``epd evaluate``: the embedded metrics on digit samples, the text-to-image scorers
and FID on a folder of colour PNGs, and bad input refused before anything is written."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from epd.cli import main


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _load(folder, rows):
    return torch.stack([torch.from_numpy(np.array(Image.open(folder / r["path"])))[None] for r in rows])


@pytest.fixture(scope="module")
def digit_samples(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "samples"
    assert main(["sample", "--solver", "dpmpp_2m", "--nfe", "8", "--schedule", "logsnr", "--labels", "3,7",
                 "--seeds", "0-79", "--outdir", str(out), "--no-progress"]) == 0
    return out


def test_sample_writes_manifest(digit_samples):
    rows = _rows(digit_samples / "samples.csv")
    assert [int(r["seed"]) for r in rows] == list(range(80))
    assert [r["label"] for r in rows[:4]] == ["3", "7", "3", "7"]           # cycled as generate() cycles them
    assert all(r["prompt"] == "" for r in rows)
    assert rows[5]["path"] == "000000/000005.png" and (digit_samples / rows[5]["path"]).is_file()


def test_evaluate_digits_matches_the_metrics(digit_samples, tmp_path):
    from epd.metrics.digits import data_pixels, fd_digits, label_accuracy
    from epd.rewards import load_reward

    out = tmp_path / "eval"
    assert main(["evaluate", "--samples", str(digit_samples), "--metrics", "fd_digits", "label_accuracy",
                 "label_logprob", "realism", "--out", str(out), "--batch", "32", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    per = _rows(out / "per_image.csv")
    assert len(per) == 80 and list(per[0])[:4] == ["seed", "label", "prompt", "path"]
    images = _load(digit_samples, per)
    labels = torch.tensor([int(r["label"]) for r in per])
    assert summary["label_accuracy"]["mean"] == pytest.approx(label_accuracy(images, labels), abs=1e-12)
    assert summary["label_accuracy"]["mean"] > 0.9       # 8-step DPM-Solver++ digits are readable
    assert summary["fd_digits"]["value"] == pytest.approx(fd_digits(images, data_pixels("train")[0]), rel=1e-9)
    logp = load_reward("label_logprob").score(images, [f"the digit {int(v)}" for v in labels]).numpy()
    col = np.array([float(r["label_logprob"]) for r in per])
    assert np.allclose(col, logp, rtol=1e-5, atol=1e-6)
    for m in ("label_logprob", "realism"):
        col = np.array([float(r[m]) for r in per])
        assert summary[m]["n"] == 80
        assert summary[m]["mean"] == pytest.approx(col.mean(), rel=1e-5)
        assert summary[m]["std"] == pytest.approx(col.std(), rel=1e-4)


def test_prompted_digits_read_the_prompt(tmp_path):
    out = tmp_path / "s"
    assert main(["sample", "--solver", "dpmpp_2m", "--nfe", "8", "--schedule", "logsnr", "--prompt",
                 "a handwritten 4", "--seeds", "0-7", "--outdir", str(out), "--no-subdirs", "--no-progress"]) == 0
    rows = _rows(out / "samples.csv")
    assert rows[0] == {"seed": "0", "label": "", "prompt": "a handwritten 4", "path": "000000.png"}
    assert main(["evaluate", "--samples", str(out), "--metrics", "label_accuracy", "--out", str(tmp_path / "e"),
                 "--no-progress"]) == 0
    s = json.loads((tmp_path / "e" / "summary.json").read_text())["label_accuracy"]
    assert s["n"] == 8 and s["mean"] >= 0.75


def test_backend_config_overrides_flags(tmp_path):
    def run(name, *extra):
        out = tmp_path / name
        assert main(["sample", "--solver", "euler", "--nfe", "4", "--labels", "1", "--seeds", "0-3", "--outdir",
                     str(out), "--no-progress", *extra]) == 0
        return _load(out, _rows(out / "samples.csv"))

    default = run("default")
    flags = run("flags", "--component-std", "0.3")
    inline = run("inline", "--backend-config", '{"component_std": 0.3}')
    (tmp_path / "opts.json").write_text('{"component_std": 0.3}')
    from_file = run("file", "--backend-config", str(tmp_path / "opts.json"))
    assert torch.equal(flags, inline) and torch.equal(flags, from_file)
    assert not torch.equal(default, inline)
    assert main(["sample", "--backend-config", "[1, 2]", "--outdir", str(tmp_path / "bad"), "--no-progress"]) == 2
    assert not (tmp_path / "bad").exists()


def test_bad_input_writes_nothing(digit_samples, tmp_path, capsys):
    out = tmp_path / "eval"
    cases = [
        (["--samples", str(tmp_path), "--metrics", "realism"], "samples.csv"),
        (["--samples", str(digit_samples), "--metrics", "sharpness"], "invalid choice: 'sharpness'"),
        (["--samples", str(digit_samples), "--metrics", "fid"], "reference-stats"),
        (["--samples", str(digit_samples), "--metrics", "hpsv2"], "hpsv2: no weights path"),
        (["--samples", str(digit_samples), "--metrics", "clip", "--weights", "clip"], "--weights takes KEY=PATH"),
        (["--samples", str(digit_samples), "--metrics", "fid", "--reference-stats", str(tmp_path / "r.npz")],
         "r.npz"),
    ]
    for args, message in cases:
        assert main(["evaluate", *args, "--out", str(out), "--no-progress"]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "samples.csv").write_text("seed,label,prompt,path\n0,,a cat,000000.png\n")
    assert main(["evaluate", "--samples", str(broken), "--metrics", "realism", "--out", str(out)]) == 2
    assert "000000.png missing" in capsys.readouterr().err and not out.exists()


# --- text-to-image ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def colour_samples(tmp_path_factory):
    """Two folders of 6 random colour PNGs with prompts, in the layout `epd sample` writes."""
    from epd.sample import save_pngs, write_manifest

    root = tmp_path_factory.mktemp("t2i")
    prompts = ["a red fox in the snow", "a bowl of soup", "a city at night"]
    folders = []
    for k, (lo, hi) in enumerate([(0, 255), (60, 120)]):
        g = torch.Generator().manual_seed(k)
        imgs = torch.randint(lo, hi + 1, (6, 3, 40, 40), generator=g, dtype=torch.int64).to(torch.uint8)
        folder = root / f"set{k}"
        save_pngs(imgs, range(6), folder)
        write_manifest(folder, list(range(6)), prompts=prompts)
        folders.append(folder)
    return folders


def test_evaluate_text_to_image_scorers(colour_samples, tmp_path):
    pytest.importorskip("open_clip")
    from tiny_t2i import save_aesthetic, save_clip

    from epd.rewards import load_reward

    save_clip(tmp_path / "clip", seed=6)
    save_aesthetic(tmp_path / "aes.pth")
    out = tmp_path / "eval"
    assert main(["evaluate", "--samples", str(colour_samples[0]), "--metrics", "clip", "aesthetic",
                 "--weights", f"clip={tmp_path / 'clip'}", "--weights", f"aesthetic={tmp_path / 'aes.pth'}",
                 "--device", "cpu", "--batch", "4", "--out", str(out), "--no-progress"]) == 0
    per = _rows(out / "per_image.csv")
    summary = json.loads((out / "summary.json").read_text())
    images = torch.stack([torch.from_numpy(np.array(Image.open(colour_samples[0] / r["path"]))).permute(2, 0, 1)
                          for r in per])
    want = load_reward("clip", weights=tmp_path / "clip", device="cpu").score(images, [r["prompt"] for r in per])
    assert np.allclose([float(r["clip"]) for r in per], want.numpy(), rtol=1e-5, atol=1e-5)
    assert summary["clip"]["mean"] == pytest.approx(float(want.mean()), rel=1e-5)
    assert summary["aesthetic"]["n"] == 6 and np.isfinite(summary["aesthetic"]["std"])


@pytest.mark.slow   # ~35 s on one thread: Inception-v3 at 299 × 299 on 18 images
def test_evaluate_fid_against_written_reference(colour_samples, tmp_path):
    pytest.importorskip("torch_fidelity")
    from tiny_t2i import _random_inception

    torch.manual_seed(0)
    torch.save(_random_inception().state_dict(), tmp_path / "inception.pth")
    ref = tmp_path / "ref.npz"
    inception = f"inception={tmp_path / 'inception.pth'}"
    assert main(["evaluate", "--samples", str(colour_samples[0]), "--write-reference-stats", str(ref),
                 "--weights", inception, "--no-progress"]) == 0
    with np.load(ref, allow_pickle=False) as data:
        assert data["mu"].shape == (2048,) and data["sigma"].shape == (2048, 2048)
    values = []
    for folder in colour_samples:
        out = tmp_path / folder.name
        assert main(["evaluate", "--samples", str(folder), "--metrics", "fid", "--reference-stats", str(ref),
                     "--weights", inception, "--out", str(out), "--no-progress"]) == 0
        values.append(json.loads((out / "summary.json").read_text())["fid"]["value"])
    assert abs(values[0]) < 1e-6 * max(1.0, values[1])    # a set against its own statistics
    assert values[1] > 0


# --- experiment configs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, backbone, guidance, resolution", [("sd15", "sd15", 7.5, 512),
                                                                  ("sd3_512", "sd3", 4.5, 512),
                                                                  ("sd3_1024", "sd3", 4.5, 1024)])
def test_text_to_image_configs(name, backbone, guidance, resolution):
    """Upstream's settings: 10 EPD steps with K = 2, its guidance and resolution, an HPSv2.1 reward; the train and
    evaluation prompts are disjoint files that exist."""
    from epd.config import load_config
    from epd.data import read_prompts
    from epd.solvers.plan import plan_for_nfe

    root = __import__("pathlib").Path(__file__).parents[2]
    cfg = load_config(root / "config" / f"{name}.yaml")
    assert cfg.backbone.name == backbone
    assert cfg.backbone.options.guidance == guidance
    assert cfg.backbone.options.resolution == resolution
    assert [plan_for_nfe("epd", n).num_steps - 1 for n in cfg.pipeline.nfe] == [10]
    assert cfg.distill.num_points == 2
    assert cfg.rdpo.reward == {"hpsv2": 1.0}
    train, held = read_prompts(root / cfg.rdpo.prompts), read_prompts(root / cfg.sample.prompts)
    assert len(train) >= 32 and len(held) >= 32 and not set(train) & set(held)
