"""Solver benchmark on an embedded backbone: every solver × grid × NFE against a converged solve of the same ODE.

Samples are class-conditional by default (labels cycling 0–9 over the seeds). Per cell, on each of two disjoint seed
sets (their spread is the noise of each figure):

- solver accuracy, the headline: the samples decoded to 8-bit images against the reference solution's images from
  the same noise, by the functions ``epd evaluate --reference`` applies to sample folders
  (:mod:`epd.metrics.reference`): ``fd_to_reference`` (pixel-space Fréchet distance), ``fd_digits_to_reference``
  (the same on digit-classifier features), ``rms_to_reference`` (per-image RMS in [0, 1] pixel units, averaged) and
  ``mode_agreement`` (fraction nearest the same data point as the reference image);

and, measuring model and solver together or in the backbone's state space:

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
- ``fd_to_exact`` (CSV only): Fréchet distance to the reference's samples from the same noise, in state space
  (not clipped, not quantised: four times ``fd_to_reference`` where nothing is clipped).

The reference is :mod:`epd.solvers.reference` (``gmm-digits``: the exact ODE; ``unet-digits``: the network's ODE,
there being no exact solution for a learned denoiser); its own error, estimated against a run with twice the steps,
is printed beside the tables, in state space and as the accuracy metrics of the reference against the finer run
(``benchmark.reference.json`` holds these figures per seed set).
"""
from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .backbones import Backbone, load_backbone
from .backbones.base import DataPoints
from .io import atomic_write
from .metrics import frechet_distance, gaussian_stats
from .metrics import reference as accuracy
from .metrics.digits import digit_features, fd_digits, fd_digits_stats, label_accuracy, load_digit_classifier
from .schedules import SCHEDULES
from .solvers import BASELINES, load_grid, load_table
from .solvers.common import select_rows
from .solvers.plan import Configured, check_grid_use, check_table_use, configure
from .solvers.reference import reference_error, reference_steps, solve_reference

DEFAULT_SOLVERS = [*BASELINES, "epd", "epd_plugin"]
DEFAULT_SCHEDULES = ["polynomial", "logsnr", "time_uniform"]


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
    # Learned grids of baselines (epd ld3), as PATH or LABEL=PATH (default label: ld3-SOLVER), grid column "learned"
    grids: list[str] = field(default_factory=list)
    num_samples: int = 10_000                          # per seed set
    seed_sets: int = 2
    first_seed: int = 0                                # seed set k is first_seed + [k·num_samples, (k+1)·num_samples)
    labels: list[int] | None = field(default_factory=lambda: list(range(10)))  # cycled over seeds; None: uncond.
    batch_size: int = 10_000
    reference_steps: int | None = None                 # None: the backbone's reference_steps
    reference_check: int = 1000                        # samples re-solved with twice the steps
    rho: float = 7.0

    def steps(self) -> int:
        return self.reference_steps or reference_steps(self.backbone)


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
    """The reference solution at σ_min and at 0 (:func:`epd.solvers.reference.solve_reference`), float64."""
    return solve_reference(backbone, x, steps, sigma_min=backbone.sigma_min, sigma_max=backbone.sigma_max,
                           cond=cond, batch_size=batch_size, at_zero=True)


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
        # a table that carries its own grid on a named schedule learned it
        grid = "learned" if table.meta.grid is not None and table.meta.schedule in SCHEDULES else table.meta.schedule
        run = configure("epd_plugin" if table.meta.plugin else "epd", table=table)
        cells.append((label, grid, table.meta.nfe, run))
    for spec in cfg.grids:
        label, path = spec.split("=", 1) if "=" in spec else (None, spec)
        grid = load_grid(path)
        check_grid_use(grid, backbone=backbone.name, sigma_max=backbone.sigma_max, source=path)
        cells.append((label or f"ld3-{grid.solver}", "learned", grid.nfe, configure(grid.solver, grid=grid)))
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


@dataclass(frozen=True)
class ReferenceImages:
    """The reference's 8-bit images (what ``epd sample --solver reference`` would write) and their statistics in
    pixel and digit-feature space, computed once and compared with every cell."""

    images: torch.Tensor
    pixel_stats: tuple[np.ndarray, np.ndarray]
    feature_stats: tuple[np.ndarray, np.ndarray]


def reference_images(backbone: Backbone, x: torch.Tensor, classifier) -> ReferenceImages:
    """Decode reference states ``x`` and fit their statistics."""
    images = backbone.decode(x)
    return ReferenceImages(images, accuracy.pixel_stats(images), fd_digits_stats(images, classifier))


def solver_accuracy(images: torch.Tensor, ref: ReferenceImages, data_pixels: DataPoints,
                    classifier) -> dict[str, float]:
    """The accuracy metrics of uint8 ``images`` against the reference images of the same seeds (per-image ones
    averaged): exactly what ``epd evaluate --reference`` reports for the two sample folders."""
    return {
        "fd_to_reference": accuracy.fd_to_reference(images, ref.pixel_stats),
        "fd_digits_to_reference": accuracy.fd_digits_to_reference(images, ref.feature_stats, classifier),
        "rms_to_reference": float(accuracy.rms_to_reference(images, ref.images).mean()),
        "mode_agreement": float(accuracy.mode_agreement(images, ref.images, data_pixels).mean()),
    }


ACCURACY_METRICS = ("fd_to_reference", "rms_to_reference", "mode_agreement", "fd_digits_to_reference")


def run_benchmark(cfg: BenchConfig, progress: bool = True) -> tuple[list[dict], dict]:
    """Measure every cell; returns the per-seed-set rows and a summary of the reference and floor."""
    backbone = load_backbone(cfg.backbone, **cfg.backbone_options)
    classifier = load_digit_classifier()
    labels = cycled_labels(cfg.labels, cfg.num_samples)
    targets = data_targets(backbone, labels, classifier)
    nearest = targets.data.nearest
    data_pixels = accuracy.pixel_data_points(backbone)
    cond = None if labels is None else backbone.encode(labels=labels.tolist())
    rows = []
    info: dict[str, list[float]] = {"reference_error_rms": [], "reference_agree": [], "fd_floor": [],
                                    "endpoint_gap_rms": [], "reference_fd_digits": [], "reference_label_acc": [],
                                    **{f"reference_{m}": [] for m in ACCURACY_METRICS}}
    cells = _cells(cfg, backbone)
    for k in range(cfg.seed_sets):
        seeds = range(cfg.first_seed + k * cfg.num_samples, cfg.first_seed + (k + 1) * cfg.num_samples)
        noise = backbone.noise(seeds, dtype=torch.float64)
        ref_min, ref_zero = reference_solution(backbone, noise, cfg.steps(), cfg.batch_size, cond)
        # The reference's own error: the same noise (a subset) with twice the steps.
        m = min(cfg.reference_check, len(noise))
        error = reference_error(backbone, noise[:m], cfg.steps(), sigma_min=backbone.sigma_min,
                                sigma_max=backbone.sigma_max, cond=select_rows(cond, torch.arange(m)),
                                data=targets.data, batch_size=cfg.batch_size, solved=ref_min[:m])
        info["reference_error_rms"].append(error.rms)
        info["reference_agree"].append(error.same_mode)
        own = solver_accuracy(backbone.decode(ref_min[:m]), reference_images(backbone, error.finer, classifier),
                              data_pixels, classifier)
        for metric, value in own.items():
            info[f"reference_{metric}"].append(value)
        info["endpoint_gap_rms"].append(_rms(ref_min, ref_zero))
        ref_quality = sample_quality(backbone, ref_min, labels, targets, classifier)
        floor = ref_quality["fd"]
        info["fd_floor"].append(floor)
        info["reference_fd_digits"].append(ref_quality["fd_digits"])
        info["reference_label_acc"].append(ref_quality["label_acc"])
        ref_stats = {False: gaussian_stats(ref_min), True: gaussian_stats(ref_zero)}
        ref_nearest = {False: nearest(ref_min), True: nearest(ref_zero)}
        ref_images = {False: reference_images(backbone, ref_min, classifier),
                      True: reference_images(backbone, ref_zero, classifier)}
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
                **solver_accuracy(backbone.decode(out), ref_images[ends_at_zero], data_pixels, classifier),
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


# The printed tables, by section: solver accuracy first (the headline), then the samples against the data (which
# measure model and solver together), then the state-space figures. Each metric: (title, number format).
SECTIONS = {
    "Solver accuracy: against the reference solution of the same seeds and conditions (8-bit images)": {
        "fd_to_reference": (("FD to the reference: pixel-space Fréchet distance to the reference's images "
                             "(lower is better)"), "{:.3g}"),
        "rms_to_reference": ("RMS to the reference: per-image RMS pixel difference, [0, 1] units (lower is better)",
                             "{:.3g}"),
        "mode_agreement": (("Mode agreement: fraction nearest the same data point as the reference image "
                            "(higher is better)"), "{:.4f}"),
        "fd_digits_to_reference": (("FD-digits to the reference: Fréchet distance of classifier features to the "
                                    "reference's (lower is better)"), "{:.3g}"),
    },
    "Samples against the data (model and solver together)": {
        "fd_excess": ("Fréchet distance excess over the reference's floor (pixel space, lower is better)", "{:.3f}"),
        "fd_digits": ("FD-digits: Fréchet distance of classifier features to the data's (lower is better)", "{:.3f}"),
        "label_acc": ("Label accuracy: fraction the classifier reads as the requested digit (higher is better)",
                      "{:.4f}"),
    },
    "State space (neither clipped nor quantised) and cost": {
        "rms": ("RMS error against the reference solution (lower is better)", "{:.4f}"),
        "agree": ("Fraction ending nearest the same data point as the reference (higher is better)", "{:.4f}"),
        "overhead": ("Solver overhead: time outside denoiser calls / total", "{:.3f}"),
    },
}
METRICS = {metric: spec for section in SECTIONS.values() for metric, spec in section.items()}
HEADLINE = "fd_to_reference"


def format_report(rows: list[dict], info: dict, cfg: BenchConfig) -> str:
    """Markdown: per NFE, each solver on its best grid by FD to the reference with its accuracy and quality figures;
    then one table per metric over every solver@grid (the accuracy tables end with the reference's own row: itself
    against twice the steps)."""
    out = io.StringIO()
    nfes = sorted({r["nfe"] for r in rows})
    floor = info["fd_floor"]
    check = min(cfg.reference_check, cfg.num_samples)
    conditioning = "unconditional" if cfg.labels is None else f"labels {','.join(map(str, cfg.labels))} cycled"
    last = cfg.first_seed + cfg.seed_sets * cfg.num_samples - 1
    out.write(f"# Solver benchmark: {cfg.backbone} {cfg.backbone_options or ''}, {cfg.num_samples} samples "
              f"× {cfg.seed_sets} seed sets (seeds {cfg.first_seed}-{last}), {conditioning}\n\n")
    out.write(f"- reference: DPM-Solver++(3M), {cfg.steps()} steps uniform in log σ; its FD floor (pixel FD to the "
              f"data): {_series(floor, '{:.4f}')}; its FD-digits {_series(info['reference_fd_digits'], '{:.3f}')}; "
              f"label accuracy {_series(info['reference_label_acc'], '{:.4f}')} (per seed set)\n")
    out.write(f"- reference error on {check} samples, against a {2 * cfg.steps()}-step run: RMS "
              f"{_series(info['reference_error_rms'], '{:.2e}')}; same nearest data point "
              f"{_series(info['reference_agree'], '{:.4f}')}; through 8-bit images: "
              + "; ".join(f"{m} {_series(info[f'reference_{m}'], '{:.2e}')}" for m in ACCURACY_METRICS) + "\n")
    out.write(f"- RMS gap between the reference at σ_min and at 0: {_series(info['endpoint_gap_rms'], '{:.2e}')}"
              " (Heun ends at 0 and is compared there)\n")
    out.write("- cells: mean over seed sets ± half their range\n\n")
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    out.write(_headline(rows, info, cfg, nfes, solvers))
    for section, metrics in SECTIONS.items():
        out.write(f"\n## {section}\n")
        for metric, (title, fmt) in metrics.items():
            agg = _aggregate(rows, metric)
            if all(np.isnan(v[0]) for v in agg.values()):   # label accuracy of unconditional samples
                continue
            out.write(f"\n### {title}\n\n")
            out.write("| solver@grid | " + " | ".join(f"NFE {n}" for n in nfes) + " |\n")
            out.write("|---|" + "---|" * len(nfes) + "\n")
            for solver in solvers:
                for grid in dict.fromkeys(g for (s, g, _n) in agg if s == solver):
                    cells = [_cell(agg.get((solver, grid, n)), fmt) for n in nfes]
                    out.write(f"| {solver}@{grid} | " + " | ".join(cells) + " |\n")
            if metric in ACCURACY_METRICS:
                out.write(_reference_row(info, metric, fmt, nfes, cfg))
    return out.getvalue()


HEADLINE_COLUMNS = (*ACCURACY_METRICS, "fd_digits", "label_acc")


def _headline(rows: list[dict], info: dict, cfg: BenchConfig, nfes: list[int], solvers: list[str]) -> str:
    """Per NFE: each solver on the grid with the lowest fd_to_reference, its accuracy metrics beside the figures
    against the data; the reference's row holds its error against twice the steps and its own quality."""
    agg = {m: _aggregate(rows, m) for m in HEADLINE_COLUMNS}
    columns = [m for m in HEADLINE_COLUMNS if not all(np.isnan(v[0]) for v in agg[m].values())]
    ref_info = {**{m: info[f"reference_{m}"] for m in ACCURACY_METRICS},
                "fd_digits": info["reference_fd_digits"], "label_acc": info["reference_label_acc"]}
    out = io.StringIO()
    out.write(f"## Headline: each solver on its best grid by {HEADLINE}\n\n"
              "Solver accuracy (against the reference solution of the same seeds and conditions): "
              + ", ".join(f"{m} ({'higher' if m == 'mode_agreement' else 'lower'} is better)"
                          for m in ACCURACY_METRICS)
              + ". Model and solver together (against the data): fd_digits, label_acc. The reference's row: its "
                "accuracy against twice its steps, and its own fd_digits and label_acc.\n")
    for n in nfes:
        out.write(f"\n### NFE {n}\n\n| solver | grid | " + " | ".join(columns) + " |\n|---|---|"
                  + "---|" * len(columns) + "\n")
        for solver in solvers:
            grids = [g for (s, g, nn) in agg[HEADLINE] if s == solver and nn == n]
            if not grids:
                continue
            best = min(grids, key=lambda g: agg[HEADLINE][(solver, g, n)][0])
            cells = [_cell(agg[m][(solver, best, n)], METRICS[m][1]) for m in columns]
            out.write(f"| {solver} | {best} | " + " | ".join(cells) + " |\n")
        cells = [_cell((float(np.mean(ref_info[m])), float(np.ptp(ref_info[m]) / 2)), METRICS[m][1]) for m in columns]
        out.write(f"| reference | logsnr, {cfg.steps()} vs {2 * cfg.steps()} steps | " + " | ".join(cells) + " |\n")
    return out.getvalue()


def _reference_row(info: dict, metric: str, fmt: str, nfes: list[int], cfg: BenchConfig) -> str:
    """The reference against twice its steps, in every NFE column: the floor of the solvers' figures."""
    values = info[f"reference_{metric}"]
    cell = _cell((float(np.mean(values)), float(np.ptp(values) / 2)), fmt)
    return f"| reference: {cfg.steps()} vs {2 * cfg.steps()} steps | " + " | ".join([cell] * len(nfes)) + " |\n"


def _series(values: list[float], fmt: str) -> str:
    return ", ".join(fmt.format(v) for v in values)


def _cell(value: tuple[float, float] | None, fmt: str) -> str:
    if value is None:
        return "–"
    mean, noise = value
    return f"{fmt.format(mean)} ± {fmt.format(noise)}"


def write_outputs(rows: list[dict], report: str, outdir: Path, info: dict | None = None) -> None:
    """``benchmark.csv`` (every cell and seed set), ``benchmark.md`` (the printed report) and, given ``info``,
    ``benchmark.reference.json`` (the reference's figures per seed set), written atomically."""
    outdir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    files = [("benchmark.csv", buf.getvalue()), ("benchmark.md", report)]
    if info is not None:
        files.append(("benchmark.reference.json", json.dumps(info, indent=2) + "\n"))
    for name, text in files:
        atomic_write(outdir / name, text.encode())


def main(cfg: BenchConfig, outdir: Path, progress: bool = True) -> str:
    rows, info = run_benchmark(cfg, progress=progress)
    report = format_report(rows, info, cfg)
    write_outputs(rows, report, outdir, info)
    log_results(rows, info, outdir)
    return report


def log_results(rows: list[dict], info: dict, outdir: Path) -> None:
    """Every cell's seed-set mean as an MLflow metric (``SOLVER.GRID.nfeN.METRIC``), the reference figures, and
    the files (no-ops unless the CLI opened a run)."""
    from . import tracking

    metrics = {f"reference.{k}": float(np.mean(v)) for k, v in info.items()}
    for metric in ("fd", "fd_excess", "fd_digits", "label_acc", "rms", "agree", "overhead", *ACCURACY_METRICS):
        for (solver, grid, nfe), (mean, _noise) in _aggregate(rows, metric).items():
            if not np.isnan(mean):
                metrics[f"{solver}.{grid}.nfe{nfe}.{metric}"] = mean
    tracking.log_metrics(metrics)
    for name in ("benchmark.csv", "benchmark.md", "benchmark.reference.json"):
        tracking.log_artifact(outdir / name)


__all__ = ["ACCURACY_METRICS", "BenchConfig", "ReferenceImages", "Targets", "data_targets",
           "format_report", "main", "reference_images", "reference_solution", "run_benchmark", "sample_quality",
           "solver_accuracy"]
