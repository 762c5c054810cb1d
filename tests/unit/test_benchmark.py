"""The solver benchmark's pieces: Fréchet distance, the exact reference, and a tiny end-to-end run."""
import csv
import json

import numpy as np
import pytest
import torch
from scipy import linalg

from epd.backbones import Backbone, load_backbone
from epd.benchmark import (BenchConfig, cycled_labels, data_targets, format_report, main, reference_solution,
                           run_benchmark)
from epd.metrics import frechet_distance, gaussian_stats
from epd.solvers import handset_table, save_table


def test_frechet_matches_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    c1, c2 = a @ a.T + 0.1 * np.eye(6), b @ b.T
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    expected = ((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-8)


def test_frechet_singular_covariance_and_self_distance():
    g = load_backbone("gmm-digits")
    stats = gaussian_stats(g.components)
    assert np.linalg.matrix_rank(stats[1]) < stats[1].shape[0]  # always-dark border pixels
    assert abs(frechet_distance(*stats, *stats)) < 1e-6 * np.trace(stats[1])
    noise = gaussian_stats(torch.randn(2000, 64, generator=torch.Generator().manual_seed(0)))
    assert frechet_distance(*noise, *stats) > 10


def test_reference_is_converged():
    """The exact-ODE reference changes by far less than any solver error when its steps double."""
    g = load_backbone("gmm-digits")
    x = g.noise(range(64), dtype=torch.float64)
    coarse, _ = reference_solution(g, x, 256, 64)
    fine, at_zero = reference_solution(g, x, 512, 64)
    assert float(((coarse - fine) ** 2).mean().sqrt()) < 1e-3
    assert torch.equal(g.nearest_component(coarse), g.nearest_component(fine))
    assert float(((fine - at_zero) ** 2).mean().sqrt()) < 1e-3


def test_tiny_benchmark_run(tmp_path):
    tables = []
    for nfe, steps in ((3, 3), (5, 4)):  # a labelled pair of tables: one row, two NFE columns
        tables.append(f"mine={save_table(handset_table(steps, 2, schedule='logsnr', backbone='gmm-digits'), tmp_path / f't{nfe}')}")
    cfg = BenchConfig(solvers=["euler", "dpmpp_2m", "epd"], schedules=["logsnr"], nfes=[3, 9], num_samples=200,
                      reference_steps=64, batch_size=200, tables=tables)
    report = main(cfg, tmp_path, progress=False)
    rows = list(csv.DictReader((tmp_path / "benchmark.csv").open()))
    assert len(rows) == (3 * 2 + 2) * 2
    mine = {(int(r["nfe"]), int(r["seed_set"])): r for r in rows if r["solver"] == "mine"}
    assert sorted(mine) == [(3, 0), (3, 1), (5, 0), (5, 1)]
    # The hand-set table at NFE 3 is the same solver as the "epd" row at NFE 3 on this grid.
    epd3 = next(r for r in rows if r["solver"] == "epd" and r["nfe"] == "3" and r["seed_set"] == "0")
    assert float(mine[(3, 0)]["rms"]) == pytest.approx(float(epd3["rms"]), rel=1e-6)
    assert "| mine@logsnr |" in report
    for r in rows:
        assert int(r["measured_nfe"]) == int(r["nfe"])
        assert 0 <= float(r["agree"]) <= 1 and 0 <= float(r["overhead"]) < 1
        assert 0 <= float(r["label_acc"]) <= 1 and float(r["fd_digits"]) >= 0
    by = {(r["solver"], int(r["nfe"]), int(r["seed_set"])): r for r in rows}
    for solver in ("euler", "dpmpp_2m", "epd"):  # more NFE, closer to the exact solution
        for metric in ("rms", "rms_to_reference", "fd_to_reference", "fd_digits_to_reference"):
            assert float(by[(solver, 9, 0)][metric]) < float(by[(solver, 3, 0)][metric])
        assert float(by[(solver, 9, 0)]["mode_agreement"]) > float(by[(solver, 3, 0)]["mode_agreement"])
    for r in rows:   # pixels are half the state's scale; clipping only shrinks differences, rounding adds ≤ 1/255
        assert float(r["rms_to_reference"]) <= float(r["rms"]) / 2 + 1 / 255
    assert "NFE 3" in report and "dpmpp_2m@logsnr" in report
    assert report.index("## Headline: each solver on its best grid by fd_to_reference") < report.index("### NFE 3") \
        < report.index("## Solver accuracy") < report.index("### FD to the reference") \
        < report.index("## Samples against the data")
    assert "| reference | logsnr, 64 vs 128 steps |" in report and "| reference: 64 vs 128 steps |" in report
    info = json.loads((tmp_path / "benchmark.reference.json").read_text())
    assert len(info["reference_rms_to_reference"]) == 2 and info["reference_mode_agreement"] == [1.0, 1.0]
    assert "## FD-digits" in report and "## Label accuracy" in report and "labels 0,1,2,3,4,5,6,7,8,9 cycled" in report
    assert (tmp_path / "benchmark.md").read_text() == report


def test_data_stats_are_the_mixture():
    """Direct samples of the mixture sit at FD ≈ sampling noise from data_stats; bare digit centres do not."""
    g = load_backbone("gmm-digits")
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(len(g.components), (20000,), generator=gen)
    samples = g.components[idx] + 0.1 * torch.randn(20000, 64, generator=gen, dtype=torch.float64)
    fd_mixture = frechet_distance(*gaussian_stats(samples), *g.data_stats())
    fd_centres = frechet_distance(*gaussian_stats(g.components), *g.data_stats())
    assert fd_mixture < 0.05
    assert fd_centres > 5 * fd_mixture


def test_nearest_component_is_the_nearest_data_point():
    g = load_backbone("gmm-digits")
    x = g.noise(range(200), dtype=torch.float64) / 40  # states at a scale where the nearest point is not obvious
    brute = torch.cdist(x.reshape(200, -1), g.components).argmin(1)
    assert torch.equal(g.nearest_component(x), brute)
    assert torch.equal(g.nearest_component(x.float()), brute)


def test_tiny_unet_benchmark_run(tmp_path):
    """The same code path on the learned backbone: conditional samples, FD-digits and label accuracy per cell."""
    cfg = BenchConfig(backbone="unet-digits", solvers=["euler", "dpmpp_3m"], schedules=["logsnr"], nfes=[3, 9],
                      num_samples=100, seed_sets=1, batch_size=100, reference_steps=32, reference_check=20)
    rows, info = run_benchmark(cfg, progress=False)
    report = format_report(rows, info, cfg)
    by = {(r["solver"], int(r["nfe"])): r for r in rows}
    assert sorted(by) == [("dpmpp_3m", 3), ("dpmpp_3m", 9), ("euler", 3), ("euler", 9)]
    for solver in ("euler", "dpmpp_3m"):  # more NFE: closer to the reference, and better digits
        assert by[(solver, 9)]["rms"] < by[(solver, 3)]["rms"]
        assert by[(solver, 9)]["fd_to_reference"] < by[(solver, 3)]["fd_to_reference"]
        assert by[(solver, 9)]["fd_digits"] < by[(solver, 3)]["fd_digits"]
    assert by[("dpmpp_3m", 9)]["label_acc"] >= 0.9       # the network draws the requested digit
    assert all(r["backbone"] == "unet-digits" for r in by.values())
    assert "unet-digits" in report and "## Label accuracy" in report
    # The reference against twice its steps, through 8-bit images: an order below any solver at these NFEs (even
    # this 32-step one; the benchmark's default is 128).
    for metric in ("rms_to_reference", "fd_to_reference", "fd_digits_to_reference"):
        assert info[f"reference_{metric}"][0] < 0.1 * min(r[metric] for r in rows)
    assert info["reference_mode_agreement"][0] == 1.0


def test_unconditional_run_has_no_label_accuracy(tmp_path):
    cfg = BenchConfig(solvers=["euler"], schedules=["logsnr"], nfes=[5], num_samples=50, seed_sets=1,
                      reference_steps=32, reference_check=10, labels=None)
    report = main(cfg, tmp_path, progress=False)
    row = next(csv.DictReader((tmp_path / "benchmark.csv").open()))
    assert np.isnan(float(row["label_acc"])) and float(row["fd_digits"]) > 0
    assert "## Label accuracy" not in report and "unconditional" in report


def test_first_seed_moves_the_seed_sets():
    """Seed set 1 of a run from seed 0 is seed set 0 of a run from seed num_samples."""
    common = {"solvers": ["euler"], "schedules": ["logsnr"], "nfes": [5], "num_samples": 40, "reference_steps": 32,
              "reference_check": 10, "batch_size": 40}
    both, _ = run_benchmark(BenchConfig(seed_sets=2, **common), progress=False)
    second, info = run_benchmark(BenchConfig(seed_sets=1, first_seed=40, **common), progress=False)
    for metric in ("rms", "fd_to_reference", "fd_digits", "mode_agreement"):
        assert second[0][metric] == both[1][metric] != both[0][metric]
    assert "seeds 40-79" in format_report(second, info, BenchConfig(seed_sets=1, first_seed=40, **common))


def test_class_balanced_weights_and_stats(gmm):
    """Labels cycling 0-9 weigh each class 1/10, spread uniformly over its points; the stats are those moments."""
    labels = cycled_labels(list(range(10)), 1000)
    w = gmm.data.weights(labels)
    assert w.sum() == pytest.approx(1.0)
    for c in range(10):
        in_class = (gmm.component_labels == c).numpy()
        assert w[in_class].sum() == pytest.approx(0.1)
        assert np.ptp(w[in_class]) < 1e-15
    assert np.allclose(gmm.data.weights(None), 1 / len(gmm.data))
    assert np.allclose(gmm.data.weights(torch.full((7,), -1)), 1 / len(gmm.data))  # −1: unconditional
    # Direct samples of the class-balanced mixture sit at sampling noise from its stats.
    gen = torch.Generator().manual_seed(0)
    idx = torch.multinomial(torch.from_numpy(w), 20000, replacement=True, generator=gen)
    samples = gmm.components[idx] + 0.1 * torch.randn(20000, 64, generator=gen, dtype=torch.float64)
    assert frechet_distance(*gaussian_stats(samples), *gmm.data.stats(labels)) < 0.05
    with pytest.raises(ValueError, match="no data point has label 11"):
        gmm.data.weights(torch.tensor([11]))


def test_unet_data_points_are_the_centred_training_digits():
    from epd.data import digit_split

    u = load_backbone("unet-digits")
    split = digit_split()
    assert len(u.data) == len(split.train_labels) and torch.equal(u.data.labels, split.train_labels)
    assert torch.allclose(u.to_pixels(u.data.points.reshape(-1, 1, 8, 8)).double(), (split.train_images + 1) / 2,
                          atol=1e-6)
    x = u.noise(range(100), dtype=torch.float64) / 40
    assert torch.equal(u.data.nearest(x), torch.cdist(x.reshape(100, -1), u.data.points).argmin(1))


def test_backbone_without_data_points_is_refused():
    class Bare(Backbone):
        name = "bare"

    with pytest.raises(ValueError, match="needs a backbone that models data points"):
        data_targets(Bare(), None, None)
