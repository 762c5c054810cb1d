"""Solver-accuracy metrics against a reference folder: each against a known answer, the pairing by seed, and
``evaluate(..., reference=DIR)`` agreeing with the benchmark on the same samples."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from epd.backbones import load_backbone
from epd.evaluate import evaluate
from epd.metrics.reference import (
    fd_digits_to_reference,
    fd_to_reference,
    mode_agreement,
    pair_with_reference,
    pixel_data_points,
    rms_to_reference,
)
from epd.sample import generate, save_pngs, write_manifest
from epd.solvers.plan import configure

ALL = ["rms_to_reference", "mode_agreement", "fd_to_reference", "fd_digits_to_reference"]


def _folder(backbone, run, seeds, labels, out):
    for batch, images in generate(backbone, run, seeds, labels=labels, batch_size=50, progress=False):
        save_pngs(images, batch, out)
    write_manifest(out, seeds, labels=labels)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory, gmm):
    root = tmp_path_factory.mktemp("accuracy")
    seeds, labels = list(range(100)), list(range(10))
    ref = configure("reference", steps=32, sigma_min=gmm.sigma_min, sigma_max=gmm.sigma_max)
    euler = configure("euler", 3, schedule="logsnr", sigma_min=gmm.sigma_min, sigma_max=gmm.sigma_max)
    return {"reference": _folder(gmm, ref, seeds, labels, root / "reference"),
            "euler": _folder(gmm, euler, seeds, labels, root / "euler"), "root": root}


def _feature_variance(folder) -> float:
    from epd.evaluate import load_images, read_manifest
    from epd.metrics.digits import fd_digits_stats

    return float(np.trace(fd_digits_stats(load_images(folder, read_manifest(folder)))[1]))


def test_identical_folders_give_zero_and_full_agreement(folders):
    ref = folders["reference"]
    out = folders["root"] / "self"
    summary = evaluate(ref, ALL, out, reference=ref, backbone="gmm-digits", progress=False)
    assert summary["rms_to_reference"] == {"mean": 0.0, "std": 0.0, "n": 100}
    assert summary["mode_agreement"] == {"mean": 1.0, "std": 0.0, "n": 100}
    assert abs(summary["fd_to_reference"]["value"]) < 1e-12
    # zero up to the eigenvalue round-off of the Fréchet distance on 64 features (relative to their variance)
    assert abs(summary["fd_digits_to_reference"]["value"]) < 1e-6 * _feature_variance(ref)
    per = list(csv.DictReader((out / "per_image.csv").open()))
    assert list(per[0]) == ["seed", "label", "prompt", "path", "rms_to_reference", "mode_agreement"]
    assert json.loads((out / "summary.json").read_text())["fd_to_reference"]["n"] == 100


def test_fd_matches_the_closed_form_of_two_gaussians():
    """Pixel sets drawn from N(μ_a, a²I) and N(μ_b, b²I): FD = |μ_a − μ_b|² + D·(a − b)², to sampling error."""
    gen = torch.Generator().manual_seed(0)
    n, d = 20000, 16
    mu_a = 0.5 + 0.02 * torch.randn(d, generator=gen, dtype=torch.float64)
    mu_b = torch.full((d,), 0.5, dtype=torch.float64)
    a, b = 0.05, 0.03
    x = (mu_a + a * torch.randn(n, d, generator=gen, dtype=torch.float64)).reshape(n, 1, 4, 4)
    y = (mu_b + b * torch.randn(n, d, generator=gen, dtype=torch.float64)).reshape(n, 1, 4, 4)
    expected = float(((mu_a - mu_b) ** 2).sum()) + d * (a - b) ** 2
    assert fd_to_reference(x, y) == pytest.approx(expected, rel=0.03)
    assert fd_to_reference(x, y) == pytest.approx(fd_to_reference(y, x), rel=1e-9)


def test_rms_by_hand():
    images = torch.tensor([[[0, 0], [0, 0]], [[10, 20], [30, 40]]], dtype=torch.uint8)
    reference = torch.tensor([[[255, 0], [0, 51]], [[10, 20], [30, 40]]], dtype=torch.uint8)
    # image 0: pixel differences 1 and 0.2 (of 255) in four pixels -> sqrt((1 + 0.04) / 4); image 1 identical
    assert torch.allclose(rms_to_reference(images, reference), torch.tensor([(1.04 / 4) ** 0.5, 0.0],
                                                                            dtype=torch.float64), atol=1e-15)
    with pytest.raises(ValueError, match="pair them by seed"):
        rms_to_reference(images, reference[:1])


def test_a_shifted_copy_moves_rms_and_fd_by_the_shift():
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(20, 200, (300, 1, 8, 8), generator=gen, dtype=torch.uint8)
    shifted = images + 10
    assert torch.allclose(rms_to_reference(shifted, images), torch.full((300,), 10 / 255, dtype=torch.float64),
                          atol=1e-15)
    # same covariance, means 10/255 apart in each of the 64 pixels
    assert fd_to_reference(shifted, images) == pytest.approx(64 * (10 / 255) ** 2, rel=1e-6)


def test_mode_agreement_counts_samples_that_change_point(gmm):
    data = pixel_data_points(gmm)
    points = gmm.decode(gmm.data.points[:40].reshape(-1, 1, 8, 8))       # 8-bit images of 40 mixture centres
    assert torch.equal(data.nearest(points.double().unsqueeze(1) / 255), torch.arange(40))
    assert mode_agreement(points, points, data).tolist() == [1.0] * 40
    other = points.clone()
    other[::2] = points.roll(1, 0)[::2]                                     # every other sample ends elsewhere
    assert mode_agreement(other, points, data).tolist() == [0.0, 1.0] * 20
    with pytest.raises(ValueError, match="another backbone or resolution"):
        mode_agreement(points[:, :4, :4], points[:, :4, :4], data)


def test_fd_digits_to_reference_is_zero_on_itself_and_grows_with_error(folders, gmm):
    from epd.evaluate import load_images, read_manifest

    ref = load_images(folders["reference"], read_manifest(folders["reference"]))
    euler = load_images(folders["euler"], read_manifest(folders["euler"]))
    assert abs(fd_digits_to_reference(ref, ref)) < 1e-6 * _feature_variance(folders["reference"])
    assert fd_digits_to_reference(euler, ref) > 1.0


@dataclass
class Row:
    seed: int
    label: int | None
    prompt: str = ""


def test_pairing_by_seed_refuses_the_first_mismatch():
    samples = [Row(0, 0), Row(1, 1), Row(2, 2)]
    reference = [Row(2, 2), Row(1, 1), Row(0, 0), Row(3, 3)]              # another order and one more: fine
    assert [r.seed for r in pair_with_reference(samples, reference)] == [0, 1, 2]
    cases = [
        ([Row(0, 0), Row(1, 5)], "seed 1: label 5 in samples, 1 in reference"),
        ([Row(0, 0), Row(7, 7)], "seed 7 of samples is missing from reference"),
        ([Row(0, 0), Row(0, 0)], "samples: seed 0 listed twice"),
    ]
    for rows, message in cases:
        with pytest.raises(ValueError, match=message):
            pair_with_reference(rows, reference)
    with pytest.raises(ValueError, match="seed 0: prompt 'a handwritten 3' in samples, 'a handwritten 4' in ref"):
        pair_with_reference([Row(0, None, "a handwritten 3")], [Row(0, None, "a handwritten 4")])
    with pytest.raises(ValueError, match="reference: seed 2 listed twice"):
        pair_with_reference(samples, reference + [Row(2, 2)])


def test_evaluate_refuses_before_writing(folders, tmp_path):
    out = tmp_path / "eval"
    with pytest.raises(ValueError, match="need a reference folder"):
        evaluate(folders["euler"], ["rms_to_reference"], out, progress=False)
    with pytest.raises(ValueError, match="mode_agreement needs the backbone"):
        evaluate(folders["euler"], ["mode_agreement"], out, reference=folders["reference"], progress=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    lines = (folders["reference"] / "samples.csv").read_text().splitlines()
    lines[4] = lines[4].replace(",3,,", ",8,,")                              # seed 3 asked for another digit
    (bad / "samples.csv").write_text("\n".join(lines) + "\n")
    for r in lines[1:]:
        path = r.split(",")[-1]
        (bad / path).parent.mkdir(parents=True, exist_ok=True)
        (bad / path).write_bytes((folders["reference"] / path).read_bytes())
    with pytest.raises(ValueError, match="seed 3: label 3 in .*, 8 in .*bad"):
        evaluate(folders["euler"], ALL, out, reference=bad, backbone="gmm-digits", progress=False)
    big = _folder(load_backbone("gmm-digits", resolution=16), configure("euler", 3, schedule="logsnr"), [0, 1], [0],
                  tmp_path / "big")                                         # 16×16 images: no digit-classifier input
    with pytest.raises(ValueError, match="fd_digits_to_reference reads grey 8×8 digit images"):
        evaluate(big, ["fd_digits_to_reference"], out, reference=big, progress=False)
    with pytest.raises(ValueError, match="holds 256-pixel images, gmm-digits's data points have 64"):
        evaluate(big, ["mode_agreement"], out, reference=big, backbone="gmm-digits", progress=False)
    assert not out.exists()


def test_evaluate_agrees_with_the_benchmark(folders, tmp_path):
    """The benchmark's accuracy columns are what evaluate reports for the two sample folders (up to 8-bit rounding:
    the benchmark decodes float64 states, sampling float32 ones)."""
    from epd.benchmark import BenchConfig, run_benchmark

    cfg = BenchConfig(solvers=["euler"], schedules=["logsnr"], nfes=[3], num_samples=100, seed_sets=1,
                      reference_steps=32, reference_check=20, batch_size=100)
    rows, _info = run_benchmark(cfg, progress=False)
    summary = evaluate(folders["euler"], ALL, tmp_path / "e", reference=folders["reference"], backbone="gmm-digits",
                       progress=False)
    row = rows[0]
    assert summary["rms_to_reference"]["mean"] == pytest.approx(row["rms_to_reference"], rel=1e-4)
    assert summary["mode_agreement"]["mean"] == pytest.approx(row["mode_agreement"], abs=0.011)   # one sample
    for m in ("fd_to_reference", "fd_digits_to_reference"):
        assert summary[m]["value"] == pytest.approx(row[m], rel=1e-4)
    assert row["fd_to_reference"] > 0.1 and row["mode_agreement"] < 0.5            # NFE 3 Euler is far off


def test_mode_agreement_loads_the_backbone_the_reference_records(tmp_path):
    """Without a backbone given, the one in the reference folder's reference.json (with its options) is loaded:
    16×16 images compare against the 16×16 data points."""
    big = _folder(load_backbone("gmm-digits", resolution=16), configure("euler", 3, schedule="logsnr"), [0, 1], [0],
                  tmp_path / "big")
    (big / "reference.json").write_text(json.dumps({"backbone": "gmm-digits", "backbone_options": {"resolution": 16},
                                                    "steps": 32}))
    summary = evaluate(big, ["mode_agreement"], tmp_path / "e", reference=big, progress=False)
    assert summary["mode_agreement"] == {"mean": 1.0, "std": 0.0, "n": 2}
