"""Solver benchmark on an embedded backbone: every solver × grid × NFE against the exact ODE solution.

Per cell, on each of two disjoint seed sets (their spread is the noise of each figure):

- ``fd``: Fréchet distance between the generated samples and the data distribution, in pixel space (for
  ``gmm-digits`` the mixture itself: the digits' mean and covariance plus s²·I, computed exactly); ``fd_floor`` is
  the same for the exact ODE solution from the same noise (finite-sample noise only), ``fd_excess = fd − fd_floor``
  what the solver adds;
- ``rms``: RMS error of the final sample against the exact ODE solution from the same noise;
- ``agree``: fraction of samples that end nearest the same data point as the exact solution (a memorising mixture
  makes RMS dominated by the few samples that switch basin; this counts them);
- ``overhead``: time spent outside denoiser calls over total time;
- ``fd_to_exact`` (CSV only): Fréchet distance to the exact solution's samples from the same noise.

The exact solution is a fine DPM-Solver++(3M) run; its own error is estimated against a run with twice the steps and
printed beside the tables.
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
from .backbones import load_backbone
from .metrics import frechet_distance, gaussian_stats
from .solvers import BASELINES, load_table, sample_dpmpp_3m
from .solvers.plan import Configured, configure

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
    num_samples: int = 10_000                          # per seed set
    seed_sets: int = 2
    batch_size: int = 10_000
    reference_steps: int = 512
    rho: float = 7.0


class TimedDenoiser:
    """Counts the seconds spent inside the denoiser, to split a solver's time into model and overhead."""

    def __init__(self, denoiser):
        self.denoiser, self.seconds = denoiser, 0.0

    def __call__(self, x, sigma, cond=None):
        t = time.perf_counter()
        out = self.denoiser(x, sigma, cond)
        self.seconds += time.perf_counter() - t
        return out


def reference_solution(backbone, x: torch.Tensor, steps: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact ODE solution at σ_min and at 0: DPM-Solver++(3M), ``steps`` points uniform in log σ, float64."""
    sigmas = schedules.append_zero(schedules.logsnr(steps, backbone.sigma_min, backbone.sigma_max))
    at_min, at_zero = [], []
    for s in range(0, len(x), batch_size):
        states = {}

        def keep(info, states=states):
            if info["i"] == len(sigmas) - 3:   # the state reached at σ_min, before the step into 0
                states["min"] = info["x"]

        with torch.no_grad():
            at_zero.append(sample_dpmpp_3m(backbone, x[s:s + batch_size].double(), sigmas, callback=keep))
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
        table = load_table(path, expect={"backbone": backbone.name})
        label = label or ("distilled-epd-plugin" if table.meta.plugin else "distilled-epd")
        cells.append((label, table.meta.schedule, table.meta.nfe,
                      configure("epd_plugin" if table.meta.plugin else "epd", table=table)))
    return cells


def run_benchmark(cfg: BenchConfig, progress: bool = True) -> tuple[list[dict], dict]:
    """Measure every cell; returns the per-seed-set rows and a summary of the reference and floor."""
    backbone = load_backbone(cfg.backbone, **cfg.backbone_options)
    data_stats = backbone.data_stats()
    rows = []
    info = {"reference_error_rms": [], "reference_agree": [], "fd_floor": [], "endpoint_gap_rms": []}
    cells = _cells(cfg, backbone)
    for k in range(cfg.seed_sets):
        seeds = range(k * cfg.num_samples, (k + 1) * cfg.num_samples)
        noise = backbone.noise(seeds, dtype=torch.float64)
        ref_min, ref_zero = reference_solution(backbone, noise, cfg.reference_steps, cfg.batch_size)
        # The reference's own error: the same noise (a subset) with twice the steps.
        sub = noise[:1000]
        fine_min, _ = reference_solution(backbone, sub, 2 * cfg.reference_steps, cfg.batch_size)
        info["reference_error_rms"].append(_rms(ref_min[:1000], fine_min))
        info["reference_agree"].append(float((backbone.nearest_component(ref_min[:1000])
                                              == backbone.nearest_component(fine_min)).double().mean()))
        info["endpoint_gap_rms"].append(_rms(ref_min, ref_zero))
        ref_stats = {False: gaussian_stats(ref_min), True: gaussian_stats(ref_zero)}
        floor = frechet_distance(*ref_stats[False], *data_stats)
        info["fd_floor"].append(floor)
        ref_nearest = {False: backbone.nearest_component(ref_min), True: backbone.nearest_component(ref_zero)}
        for solver, schedule, nfe, run in tqdm(cells, desc=f"seed set {k}", disable=not progress):
            timed = TimedDenoiser(backbone)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = torch.cat([run(timed, noise[s:s + cfg.batch_size].float()).double()
                                 for s in range(0, len(noise), cfg.batch_size)])
            total = time.perf_counter() - t0
            ends_at_zero = bool(run.sigmas[-1] == 0)
            ref = ref_zero if ends_at_zero else ref_min
            out_stats = gaussian_stats(out)
            fd = frechet_distance(*out_stats, *data_stats)
            rows.append({
                "backbone": cfg.backbone, "solver": solver, "schedule": schedule, "nfe": nfe, "seed_set": k,
                "fd": fd, "fd_floor": floor, "fd_excess": fd - floor,
                "fd_to_exact": frechet_distance(*out_stats, *ref_stats[ends_at_zero]), "rms": _rms(out, ref),
                "agree": float((backbone.nearest_component(out) == ref_nearest[ends_at_zero]).double().mean()),
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
    "fd_excess": ("Fréchet distance excess over the exact-ODE floor (pixel space, lower is better)", "{:.3f}"),
    "rms": ("RMS error against the exact ODE solution (lower is better)", "{:.4f}"),
    "agree": ("Fraction ending nearest the same data point as the exact solution (higher is better)", "{:.4f}"),
    "overhead": ("Solver overhead: time outside denoiser calls / total", "{:.3f}"),
}


def format_report(rows: list[dict], info: dict, cfg: BenchConfig) -> str:
    """Markdown: the best grid per solver first, then one table per metric over every solver@grid."""
    out = io.StringIO()
    nfes = sorted({r["nfe"] for r in rows})
    fd = _aggregate(rows, "fd_excess")
    floor = info["fd_floor"]
    out.write(f"# Solver benchmark: {cfg.backbone} {cfg.backbone_options or ''}, {cfg.num_samples} samples "
              f"× {cfg.seed_sets} seed sets\n\n")
    out.write(f"- FD floor (exact ODE samples vs the data distribution): {', '.join(f'{f:.4f}' for f in floor)}"
              " (per seed set)\n")
    out.write(f"- reference error on 1000 samples, against a {2 * cfg.reference_steps}-step run: RMS "
              f"{', '.join(f'{e:.2e}' for e in info['reference_error_rms'])}; same nearest data point "
              f"{', '.join(f'{a:.4f}' for a in info['reference_agree'])}\n")
    out.write(f"- RMS gap between the exact solution at σ_min and at 0: "
              f"{', '.join(f'{e:.2e}' for e in info['endpoint_gap_rms'])} (Heun ends at 0 and is compared there)\n")
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
        out.write(f"\n## {title}\n\n")
        out.write("| solver@grid | " + " | ".join(f"NFE {n}" for n in nfes) + " |\n")
        out.write("|---|" + "---|" * len(nfes) + "\n")
        for solver in solvers:
            for grid in dict.fromkeys(g for (s, g, _n) in agg if s == solver):
                cells = [_cell(agg.get((solver, grid, n)), fmt) for n in nfes]
                out.write(f"| {solver}@{grid} | " + " | ".join(cells) + " |\n")
    return out.getvalue()


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
    return report


__all__ = ["BenchConfig", "format_report", "main", "run_benchmark"]
