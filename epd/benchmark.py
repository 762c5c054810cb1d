"""Solver benchmark on an embedded backbone: every solver × grid × NFE against a converged solve of the same ODE.

Samples are class-conditional by default (labels cycling 0–9 over the seeds). Per cell, on each of two disjoint seed
sets (their spread is the noise of each figure):

- ``fd``: Fréchet distance in pixel space between the samples and the data the backbone models, whose exact
  moments come from the backbone's :class:`~epd.backbones.base.DataPoints` weighted by the requested labels
  (``gmm-digits``: the mixture itself, digits plus s²·I; ``unet-digits``: its training digits); ``fd_floor`` is the
  same for the reference solution from the same noise (``gmm-digits``: finite-sample noise only; ``unet-digits``:
  also the network's own error), ``fd_excess = fd − fd_floor`` what the solver adds;
- ``fd_digits``: FD-digits, the Fréchet distance of the digit classifier's features to those of the same data points
  (the FID analogue, :mod:`epd.metrics.digits`); ``label_acc``: how often the classifier reads the requested digit;
- ``rms``: RMS error of the final sample against the reference solution from the same noise;
- ``agree``: fraction of samples that end nearest the same data point as the reference (a memorising mixture
  makes RMS dominated by the few samples that switch basin; this counts them);
- ``overhead``: time spent outside denoiser calls over total time;
- ``fd_to_exact`` (CSV only): Fréchet distance to the reference's samples from the same noise.

The reference is a fine DPM-Solver++(3M) run (``gmm-digits``: the exact ODE; ``unet-digits``: the network's ODE,
there being no exact solution for a learned denoiser); its own error is estimated against a run with twice the
steps and printed beside the tables.
"""
from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import schedules
from .backbones import Backbone, load_backbone
from .backbones.base import DataPoints
from .metrics import frechet_distance, gaussian_stats
from .metrics.digits import digit_features, fd_digits, label_accuracy, load_digit_classifier
from .solvers import BASELINES, load_table, sample_dpmpp_3m
from .solvers.plan import Configured, check_table_use, configure

DEFAULT_SOLVERS = [*BASELINES, "epd", "epd_plugin"]
DEFAULT_SCHEDULES = ["polynomial", "logsnr", "time_uniform"]
# Steps of the reference solve: the mixture's posterior sharpens as σ → 0 and needs many; the network is smooth in
# σ and converges with fewer (each report prints the check against twice the steps).
REFERENCE_STEPS = {"gmm-digits": 512, "unet-digits": 128}


@dataclass
class BenchConfig:
    backbone: str = "gmm-digits"
    backbone_options: dict = field(default_factory=dict)
    solvers: list[str] = field(default_factory=lambda: list(DEFAULT_SOLVERS))
    schedules: list[str] = field(default_factory=lambda: list(DEFAULT_SCHEDULES))
    nfes: list[int] = field(default_factory=lambda: [3, 5, 7, 9])
    # EPD tables (e.g. distilled) measured beside, as PATH or LABEL=PATH; tables sharing a label form one row per
    # grid (default label: distilled-epd / distilled-epd-plugin)
    tables: list[str] = field(default_factory=list)
    num_samples: int = 10_000                          # per seed set
    seed_sets: int = 2
    labels: list[int] | None = field(default_factory=lambda: list(range(10)))  # cycled over seeds; None: uncond.
    batch_size: int = 10_000
    reference_steps: int | None = None                 # None: REFERENCE_STEPS of the backbone
    reference_check: int = 1000                        # samples re-solved with twice the steps
    rho: float = 7.0

    def steps(self) -> int:
        return self.reference_steps or REFERENCE_STEPS.get(self.backbone, 512)


class TimedDenoiser:
    """Counts the seconds spent inside the denoiser, to split a solver's time into model and overhead."""

    def __init__(self, denoiser):
        self.denoiser, self.seconds = denoiser, 0.0

    def __call__(self, x, sigma, cond=None):
        t = time.perf_counter()
        out = self.denoiser(x, sigma, cond)
        self.seconds += time.perf_counter() - t
        return out


def reference_solution(backbone, x: torch.Tensor, steps: int, batch_size: int,
                       cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference solution at σ_min and at 0: DPM-Solver++(3M), ``steps`` points uniform in log σ, float64."""
    sigmas = schedules.append_zero(schedules.logsnr(steps, backbone.sigma_min, backbone.sigma_max))
    at_min, at_zero = [], []
    for s in range(0, len(x), batch_size):
        states = {}

        def keep(info, states=states):
            if info["i"] == len(sigmas) - 3:   # the state reached at σ_min, before the step into 0
                states["min"] = info["x"]

        with torch.no_grad():
            at_zero.append(sample_dpmpp_3m(backbone, x[s:s + batch_size].double(), sigmas,
                                           cond=None if cond is None else cond[s:s + batch_size], callback=keep))
        at_min.append(states["min"])
    return torch.cat(at_min), torch.cat(at_zero)


def _cells(cfg: BenchConfig, backbone) -> list[tuple[str, str, int, Configured]]:
    cells = []
    for solver in cfg.solvers:
        for schedule in cfg.schedules:
            for nfe in cfg.nfes:
                run = configure(solver, nfe, schedule=schedule, sigma_min=backbone.sigma_min,
                                sigma_max=backbone.sigma_max, rho=cfg.rho, backbone=backbone.name)
                cells.append((solver, schedule, nfe, run))
    for spec in cfg.tables:
        label, path = spec.split("=", 1) if "=" in spec else (None, spec)
        table = load_table(path)
        check_table_use(table, backbone=backbone.name, sigma_max=backbone.sigma_max, source=path)
        label = label or ("distilled-epd-plugin" if table.meta.plugin else "distilled-epd")
        cells.append((label, table.meta.schedule, table.meta.nfe,
                      configure("epd_plugin" if table.meta.plugin else "epd", table=table)))
    return cells


@dataclass(frozen=True)
class Targets:
    """What samples requested with given labels are measured against: the data's exact moments in pixel space and
    in the digit classifier's feature space, and the data points themselves (for the nearest one)."""

    data: DataPoints
    pixel_stats: tuple[np.ndarray, np.ndarray]
    feature_stats: tuple[np.ndarray, np.ndarray]


def data_targets(backbone: Backbone, labels: torch.Tensor | None, classifier) -> Targets:
    """The targets of ``backbone`` (which must model data points: gmm-digits, unet-digits) for ``labels``."""
    data = backbone.data
    if data is None:
        raise ValueError(f"the benchmark needs a backbone that models data points (gmm-digits, unet-digits), "
                         f"got {backbone.name!r}")
    pixels = backbone.to_pixels(data.points.reshape(-1, *backbone.shape))
    features = DataPoints(digit_features(pixels, classifier), data.labels)
    return Targets(data, data.stats(labels), features.stats(labels))


def sample_quality(backbone: Backbone, x: torch.Tensor, labels: torch.Tensor | None, targets: Targets,
                   classifier) -> dict[str, float]:
    """Pixel FD, FD-digits and label accuracy of samples ``x`` (states at σ_min or 0) against the targets."""
    pixels = backbone.to_pixels(x)
    conditional = labels is not None and bool((labels >= 0).any())
    return {
        "fd": frechet_distance(*gaussian_stats(x), *targets.pixel_stats),
        "fd_digits": fd_digits(pixels, targets.feature_stats, classifier),
        "label_acc": label_accuracy(pixels, labels, classifier) if conditional else float("nan"),
    }


def cycled_labels(labels: list[int] | None, n: int) -> torch.Tensor | None:
    """``labels`` repeated over n samples (seed j gets labels[j mod len]); None stays None (unconditional)."""
    if labels is None:
        return None
    return torch.tensor(labels, dtype=torch.long).repeat(n // len(labels) + 1)[:n]


def run_benchmark(cfg: BenchConfig, progress: bool = True) -> tuple[list[dict], dict]:
    """Measure every cell; returns the per-seed-set rows and a summary of the reference and floor."""
    backbone = load_backbone(cfg.backbone, **cfg.backbone_options)
    classifier = load_digit_classifier()
    labels = cycled_labels(cfg.labels, cfg.num_samples)
    targets = data_targets(backbone, labels, classifier)
    nearest = targets.data.nearest
    cond = None if labels is None else backbone.encode(labels=labels.tolist())
    rows = []
    info: dict[str, list[float]] = {"reference_error_rms": [], "reference_agree": [], "fd_floor": [],
                                    "endpoint_gap_rms": [], "reference_fd_digits": [], "reference_label_acc": []}
    cells = _cells(cfg, backbone)
    for k in range(cfg.seed_sets):
        seeds = range(k * cfg.num_samples, (k + 1) * cfg.num_samples)
        noise = backbone.noise(seeds, dtype=torch.float64)
        ref_min, ref_zero = reference_solution(backbone, noise, cfg.steps(), cfg.batch_size, cond)
        # The reference's own error: the same noise (a subset) with twice the steps.
        m = min(cfg.reference_check, len(noise))
        fine_min, _ = reference_solution(backbone, noise[:m], 2 * cfg.steps(), cfg.batch_size,
                                         None if cond is None else cond[:m])
        info["reference_error_rms"].append(_rms(ref_min[:m], fine_min))
        info["reference_agree"].append(float((nearest(ref_min[:m]) == nearest(fine_min)).double().mean()))
        info["endpoint_gap_rms"].append(_rms(ref_min, ref_zero))
        ref_quality = sample_quality(backbone, ref_min, labels, targets, classifier)
        floor = ref_quality["fd"]
        info["fd_floor"].append(floor)
        info["reference_fd_digits"].append(ref_quality["fd_digits"])
        info["reference_label_acc"].append(ref_quality["label_acc"])
        ref_stats = {False: gaussian_stats(ref_min), True: gaussian_stats(ref_zero)}
        ref_nearest = {False: nearest(ref_min), True: nearest(ref_zero)}
        for solver, schedule, nfe, run in tqdm(cells, desc=f"seed set {k}", disable=not progress):
            timed = TimedDenoiser(backbone)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = torch.cat([run(timed, noise[s:s + cfg.batch_size].float(),
                                     cond=None if cond is None else cond[s:s + cfg.batch_size]).double()
                                 for s in range(0, len(noise), cfg.batch_size)])
            total = time.perf_counter() - t0
            ends_at_zero = bool(run.sigmas[-1] == 0)
            ref = ref_zero if ends_at_zero else ref_min
            quality = sample_quality(backbone, out, labels, targets, classifier)
            rows.append({
                "backbone": cfg.backbone, "solver": solver, "schedule": schedule, "nfe": nfe, "seed_set": k,
                "fd": quality["fd"], "fd_floor": floor, "fd_excess": quality["fd"] - floor,
                "fd_digits": quality["fd_digits"], "label_acc": quality["label_acc"],
                "fd_to_exact": frechet_distance(*gaussian_stats(out), *ref_stats[ends_at_zero]), "rms": _rms(out, ref),
                "agree": float((nearest(out) == ref_nearest[ends_at_zero]).double().mean()),
                "overhead": (total - timed.seconds) / total, "measured_nfe": run.nfe,
            })
    return rows, info


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


def _aggregate(rows: list[dict], metric: str) -> dict[tuple[str, str, int], tuple[float, float]]:
    """Mean over seed sets and half their range (the noise of the figure)."""
    by_cell: dict[tuple[str, str, int], list[float]] = {}
    for r in rows:
        by_cell.setdefault((r["solver"], r["schedule"], r["nfe"]), []).append(r[metric])
    return {k: (float(np.mean(v)), float(np.ptp(v) / 2)) for k, v in by_cell.items()}


METRICS = {
    "fd_excess": ("Fréchet distance excess over the reference's floor (pixel space, lower is better)", "{:.3f}"),
    "fd_digits": ("FD-digits: Fréchet distance of classifier features to the data's (lower is better)", "{:.3f}"),
    "label_acc": ("Label accuracy: fraction the classifier reads as the requested digit (higher is better)",
                  "{:.4f}"),
    "rms": ("RMS error against the reference solution (lower is better)", "{:.4f}"),
    "agree": ("Fraction ending nearest the same data point as the reference (higher is better)", "{:.4f}"),
    "overhead": ("Solver overhead: time outside denoiser calls / total", "{:.3f}"),
}


def format_report(rows: list[dict], info: dict, cfg: BenchConfig) -> str:
    """Markdown: the best grid per solver first, then one table per metric over every solver@grid."""
    out = io.StringIO()
    nfes = sorted({r["nfe"] for r in rows})
    fd = _aggregate(rows, "fd_excess")
    floor = info["fd_floor"]
    conditioning = "unconditional" if cfg.labels is None else f"labels {','.join(map(str, cfg.labels))} cycled"
    out.write(f"# Solver benchmark: {cfg.backbone} {cfg.backbone_options or ''}, {cfg.num_samples} samples "
              f"× {cfg.seed_sets} seed sets, {conditioning}\n\n")
    out.write(f"- reference: DPM-Solver++(3M), {cfg.steps()} steps uniform in log σ; its FD floor (pixel FD to the "
              f"data): {_series(floor, '{:.4f}')}; its FD-digits {_series(info['reference_fd_digits'], '{:.3f}')}; "
              f"label accuracy {_series(info['reference_label_acc'], '{:.4f}')} (per seed set)\n")
    out.write(f"- reference error on {min(cfg.reference_check, cfg.num_samples)} samples, against a "
              f"{2 * cfg.steps()}-step run: RMS {_series(info['reference_error_rms'], '{:.2e}')}; same nearest data "
              f"point {_series(info['reference_agree'], '{:.4f}')}\n")
    out.write(f"- RMS gap between the reference at σ_min and at 0: {_series(info['endpoint_gap_rms'], '{:.2e}')}"
              " (Heun ends at 0 and is compared there)\n")
    out.write("- cells: mean over seed sets ± half their range\n\n")
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    out.write("## Best grid per solver (by mean excess FD over the NFEs)\n\n")
    header = "| solver | grid | " + " | ".join(f"NFE {n}" for n in nfes) + " |\n"
    out.write(header + "|---|---|" + "---|" * len(nfes) + "\n")
    for solver in solvers:
        grids = {g for (s, g, _n) in fd if s == solver}
        best = min(grids, key=lambda g: np.mean([fd[(solver, g, n)][0] for n in nfes if (solver, g, n) in fd]))
        cells = [_cell(fd.get((solver, best, n)), "{:.3f}") for n in nfes]
        out.write(f"| {solver} | {best} | " + " | ".join(cells) + " |\n")
    for metric, (title, fmt) in METRICS.items():
        agg = _aggregate(rows, metric)
        if all(np.isnan(v[0]) for v in agg.values()):   # label accuracy of unconditional samples
            continue
        out.write(f"\n## {title}\n\n")
        out.write("| solver@grid | " + " | ".join(f"NFE {n}" for n in nfes) + " |\n")
        out.write("|---|" + "---|" * len(nfes) + "\n")
        for solver in solvers:
            for grid in dict.fromkeys(g for (s, g, _n) in agg if s == solver):
                cells = [_cell(agg.get((solver, grid, n)), fmt) for n in nfes]
                out.write(f"| {solver}@{grid} | " + " | ".join(cells) + " |\n")
    return out.getvalue()


def _series(values: list[float], fmt: str) -> str:
    return ", ".join(fmt.format(v) for v in values)


def _cell(value: tuple[float, float] | None, fmt: str) -> str:
    if value is None:
        return "–"
    mean, noise = value
    return f"{fmt.format(mean)} ± {fmt.format(noise)}"


def write_outputs(rows: list[dict], report: str, outdir: Path) -> None:
    """``benchmark.csv`` (every cell and seed set) and ``benchmark.md`` (the printed report), written atomically."""
    outdir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    for name, text in (("benchmark.csv", buf.getvalue()), ("benchmark.md", report)):
        tmp = outdir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, outdir / name)


def main(cfg: BenchConfig, outdir: Path, progress: bool = True) -> str:
    rows, info = run_benchmark(cfg, progress=progress)
    report = format_report(rows, info, cfg)
    write_outputs(rows, report, outdir)
    log_results(rows, info, outdir)
    return report


def log_results(rows: list[dict], info: dict, outdir: Path) -> None:
    """Every cell's seed-set mean as an MLflow metric (``SOLVER.GRID.nfeN.METRIC``), the reference figures, and
    the two files (no-ops unless the CLI opened a run)."""
    from . import tracking

    metrics = {f"reference.{k}": float(np.mean(v)) for k, v in info.items()}
    for metric in ("fd", "fd_excess", "fd_digits", "label_acc", "rms", "agree", "overhead"):
        for (solver, grid, nfe), (mean, _noise) in _aggregate(rows, metric).items():
            if not np.isnan(mean):
                metrics[f"{solver}.{grid}.nfe{nfe}.{metric}"] = mean
    tracking.log_metrics(metrics)
    for name in ("benchmark.csv", "benchmark.md"):
        tracking.log_artifact(outdir / name)


__all__ = ["BenchConfig", "Targets", "data_targets", "format_report", "main", "reference_solution", "run_benchmark",
           "sample_quality"]
