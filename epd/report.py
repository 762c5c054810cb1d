"""The pipeline's report: a summary table (solver × NFE × metrics) from `epd evaluate` summaries, and plots —
quality against NFE per solver, the distillation loss and RDPO reward curves, and a grid of samples per solver.

It reads a pipeline's results folder (``results/<experiment>/`` as the Snakemake rules and dvc.yaml lay it out):
``eval/<solver>-nfe<N>/summary.json`` (a folder name is a table row), ``samples/<solver>-nfe<N>/`` (grids) and
``tables/*.loss.csv`` (distillation) / ``tables/*.metrics.csv`` (RDPO). Every run found there is reported, so a
folder that also holds runs of an earlier config shows them too.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .evaluate import HIGHER_IS_BETTER, SOLVER_ACCURACY
from .io import atomic_write
from .solvers.grid import GridError, load_grid
from .solvers.registry import SOLVERS

RUN_NAME = re.compile(r"^(?P<solver>[A-Za-z0-9_]+)-nfe(?P<nfe>\d+)$")
REFERENCE = "reference"   # the folder of the reference solver's samples: its row is the floor, not a contender
OUTPUTS = ("summary.md", "summary.csv", "quality_vs_nfe.png", "curves.png", "grids.png")
GRID_IMAGES = 10  # samples per solver row in grids.png
LEARNED = ("epd", "rdpo", "ld3")  # the pipeline's own tables and learned peers: listed before the baselines


@dataclass(frozen=True)
class Row:
    """One evaluated sample folder: its solver, NFE (None for the reference) and ``{metric: {"mean", "std", "n"} |
    {"value"}}``."""

    solver: str
    nfe: int | None
    metrics: dict[str, dict[str, float]]


def parse_run_name(name: str, what: Path) -> tuple[str, int | None]:
    """``"epd-nfe5"`` → ``("epd", 5)``, ``"reference"`` → ``("reference", None)``; anything else is refused naming
    the path."""
    if name == REFERENCE:
        return REFERENCE, None
    m = RUN_NAME.match(name)
    if m is None:
        raise ValueError(f"{what}: cannot tell solver and NFE from {name!r}; expected a name like 'epd-nfe5'")
    return m["solver"], int(m["nfe"])


def read_summaries(paths: Sequence[str | os.PathLike]) -> list[Row]:
    """Read ``<solver>-nfe<N>/summary.json`` files (docs/formats.md) into rows: the learned tables first, then the
    baselines by name, NFE ascending."""
    rows = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"evaluation summary {path} does not exist (run `epd evaluate` first)")
        solver, nfe = parse_run_name(path.parent.name, path)
        try:
            metrics = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(metrics, dict) or not all(isinstance(v, dict) and ("mean" in v or "value" in v)
                                                     for v in metrics.values()):
            raise ValueError(f"{path}: expected {{metric: {{'mean', 'std', 'n'}} or {{'value'}}}}")
        rows.append(Row(solver, nfe, metrics))
    return sorted(rows, key=lambda r: (r.solver == REFERENCE, r.solver not in LEARNED,
                                       LEARNED.index(r.solver) if r.solver in LEARNED else 0, r.solver, r.nfe or 0))


def metric_names(rows: Sequence[Row]) -> list[str]:
    """Every metric of the rows, the solver-accuracy ones first (the headline)."""
    names = list(dict.fromkeys(m for r in rows for m in r.metrics))
    return [m for m in SOLVER_ACCURACY if m in names] + [m for m in names if m not in SOLVER_ACCURACY]


def best_per_nfe(rows: Sequence[Row]) -> set[tuple[str, int | None, str]]:
    """(solver, NFE, metric) of the best value of each metric at each NFE (the reference does not compete)."""
    best = set()
    for nfe in {r.nfe for r in rows if r.solver != REFERENCE}:
        group = [r for r in rows if r.nfe == nfe and r.solver != REFERENCE]
        for m in metric_names(rows):
            values = [(headline(r.metrics.get(m)), r.solver) for r in group]
            values = [(v, s) for v, s in values if not math.isnan(v)]
            if len(values) > 1:
                top = (max if m in HIGHER_IS_BETTER else min)(v for v, _ in values)
                best |= {(s, nfe, m) for v, s in values if v == top}
    return best


def metrics_note(rows: Sequence[Row]) -> str:
    """The line under the table: which metrics measure the solver, which the model and the solver together."""
    names = metric_names(rows)
    accuracy = [m for m in names if m in SOLVER_ACCURACY]
    other = [m for m in names if m not in SOLVER_ACCURACY]
    parts = []
    if accuracy:
        parts.append(f"Solver accuracy (distance to the reference solution of the same seeds and conditions): "
                     f"{', '.join(accuracy)}.")
    if other:
        parts.append(f"Model and solver together (against data or by a scorer; the reference row is what the "
                     f"converged solver scores, and beating it is not more accurate): {', '.join(other)}.")
    return " ".join(parts) + " Bold: the best row of each NFE."


def headline(entry: dict[str, float] | None) -> float:
    """The number a metric is ranked by: the mean of a per-image metric, the value of a set-level one."""
    value = None if entry is None else entry["mean"] if "mean" in entry else entry["value"]
    return math.nan if value is None else float(value)


def peer_labels(results: str | os.PathLike) -> dict[str, str]:
    """How the report names the learned peers of a results folder: ``ld3`` → ``LD3 (iPNDM)``, its solver read from
    the grid files (``tables/ld3-nfe<N>.json``)."""
    solvers = set()
    for path in Path(results).glob("tables/ld3-nfe*.json"):
        try:
            solvers.add(load_grid(path).solver)
        except GridError as e:
            raise ValueError(f"{path} is not a grid file written by `epd ld3`: {e}") from None
    return {"ld3": f"LD3 ({', '.join(SOLVERS[s].title for s in sorted(solvers))})"} if solvers else {}


def format_table(rows: Sequence[Row], reference: dict | None = None, labels: dict[str, str] | None = None) -> str:
    """Markdown: one row per solver × NFE, one column per metric (mean ± std for per-image metrics), the best row of
    each NFE in bold, the reference's own row last; then the note on what the metrics measure and, given
    ``reference`` (its reference.json), the reference's own error. ``labels`` renames solvers (learned peers)."""
    labels = labels or {}
    names = metric_names(rows)
    best = best_per_nfe(rows)
    lines = ["| solver | NFE | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in rows:
        cells = []
        for m in names:
            e = r.metrics.get(m)
            text = ("" if e is None else f"{e['value']:.4g}" if "value" in e
                    else f"{e['mean']:.4g} ± {e.get('std', math.nan):.2g}")
            cells.append(f"**{text}**" if text and (r.solver, r.nfe, m) in best else text)
        nfe = "—" if r.nfe is None else r.nfe
        lines.append(f"| {labels.get(r.solver, r.solver)} | {nfe} | " + " | ".join(cells) + " |")
    lines += ["", metrics_note(rows)]
    if reference:
        same = "" if reference.get("same_mode") is None else f", same mode {reference['same_mode']:.4f}"
        check = ("its own error not checked (sample.reference_check = 0)" if reference.get("rms") is None else
                 f"against {2 * reference['steps']} steps on {reference['samples']} samples, state RMS "
                 f"{reference['rms']:.2e}{same}")
        lines.append(f"Reference: DPM-Solver++(3M), {reference['steps']} steps uniform in log σ; {check}.")
    return "\n".join(lines) + "\n"


def format_csv(rows: Sequence[Row]) -> str:
    """One row per solver × NFE; per-image metrics as ``M_mean, M_std, M_n``, set-level ones as ``M``."""
    names = metric_names(rows)
    cols = []
    for m in names:
        per_image = any("mean" in r.metrics.get(m, {}) for r in rows)
        cols += [f"{m}_mean", f"{m}_std", f"{m}_n"] if per_image else [m]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["solver", "nfe", *cols])
    for r in rows:
        values = []
        for m in names:
            e = r.metrics.get(m, {})
            keys = ("mean", "std", "n") if f"{m}_mean" in cols else ("value",)
            values += [e.get(k, "") for k in keys]
        w.writerow([r.solver, "" if r.nfe is None else r.nfe, *values])
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    atomic_write(path, buf.getvalue())


def plot_quality(rows: Sequence[Row], path: Path, labels: dict[str, str] | None = None) -> None:
    """One panel per metric: its headline value against NFE, one line per solver (``labels`` renames solvers)."""
    labels = labels or {}
    plt = _pyplot()
    names = metric_names(rows)
    cols = min(len(names), 3)
    fig, axes = plt.subplots(math.ceil(len(names) / cols), cols, figsize=(4.2 * cols, 3.2 * math.ceil(len(names) / cols)),
                             squeeze=False)
    for ax, m in zip(axes.flat, names):
        for solver in dict.fromkeys(r.solver for r in rows if r.solver != REFERENCE):
            pts = [(r.nfe, headline(r.metrics.get(m))) for r in rows if r.solver == solver]
            ax.plot(*zip(*pts), marker="o", label=labels.get(solver, solver))
        for r in rows:
            if r.solver == REFERENCE and not math.isnan(headline(r.metrics.get(m))):
                ax.axhline(headline(r.metrics.get(m)), color="k", ls="--", lw=1, label=REFERENCE)
        ax.set_title(m)
        ax.set_xlabel("NFE")
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def read_curve(path: Path) -> tuple[list[str], list[str], list[list[float]]]:
    """A training-curve CSV → (header, columns to plot, rows); the first column is the step. Loss curves plot ``loss``; RDPO metrics the columns that
    name a reward or a loss (all numeric ones if none does)."""
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or len(header) < 2:
            raise ValueError(f"curve {path} needs a header with a step column and at least one value column")
        data = []
        for line in reader:
            try:
                data.append([float(v) if v != "" else math.nan for v in line])
            except ValueError:
                raise ValueError(f"curve {path}: non-numeric row {line}") from None
    ys = [c for c in header[1:] if "reward" in c or "loss" in c] or header[1:]
    return header, ys, data


def plot_curves(paths: Sequence[str | os.PathLike], path: Path) -> None:
    """One panel per curve file: the distillation loss (log scale) or the RDPO reward against the step."""
    plt = _pyplot()
    paths = [Path(p) for p in paths]
    n = max(len(paths), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.2), squeeze=False)
    for ax, p in zip(axes.flat, paths):
        header, ys, data = read_curve(p)
        for y in ys:
            ax.plot([r[0] for r in data], [r[header.index(y)] for r in data], label=y)
        if ys == ["loss"]:
            ax.set_yscale("log")
        ax.set_xlabel(header[0])
        ax.set_title(p.name, fontsize=9)
        ax.legend(fontsize=7)
    if not paths:
        axes.flat[0].axis("off")
    fig.tight_layout()
    _save(fig, path)


def sample_images(folder: Path, count: int) -> list[Path]:
    """``count`` images of ``folder/samples.csv`` (paths relative to the folder, docs/formats.md), one per conditioning
    spread over the distinct labels/prompts in their order (digits.txt: one per digit), in manifest order."""
    manifest = folder / "samples.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} does not exist (a sample folder written by `epd sample`)")
    with manifest.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise ValueError(f"{manifest} has no 'path' column")
        rows = list(reader)
    first: dict[tuple[str, str], dict] = {}
    for row in rows:
        first.setdefault((row.get("label", ""), row.get("prompt", "")), row)
    picked = list(first.values())[::max(1, len(first) // count)][:count]
    picked += [r for r in rows if all(r is not p for p in picked)][:count - len(picked)]  # too few conditionings
    order = {id(r): i for i, r in enumerate(rows)}
    return [folder / r["path"] for r in sorted(picked, key=lambda r: order[id(r)])]


def plot_grids(folders: Sequence[str | os.PathLike], path: Path, count: int = GRID_IMAGES) -> None:
    """One row per sample folder, ``count`` of its images (the same seeds and prompts in every row)."""
    import numpy as np
    from PIL import Image

    plt = _pyplot()
    folders = [Path(f) for f in folders]
    strips = []
    for folder in folders:
        images = [np.asarray(Image.open(p).convert("RGB")) for p in sample_images(folder, count)]
        if not images:
            raise ValueError(f"{folder}/samples.csv lists no images")
        pad = np.full((images[0].shape[0], 1, 3), 96, dtype=np.uint8)  # a grey line between tiles
        strips.append(np.concatenate([x for img in images for x in (img, pad)][:-1], axis=1))
    fig, axes = plt.subplots(max(len(strips), 1), 1, figsize=(1.0 * count, 1.1 * max(len(strips), 1)), squeeze=False)
    for ax, folder, strip in zip(axes.flat, folders, strips):
        ax.imshow(strip, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(folder.name, rotation=0, ha="right", va="center", fontsize=8)
    if not strips:
        axes.flat[0].axis("off")
    fig.tight_layout()
    _save(fig, path)


def find_results(results: str | os.PathLike) -> tuple[list[Path], list[Path], list[Path]]:
    """A results folder → (evaluation summaries, their sample folders where present, training curves)."""
    root = Path(results)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder {root} does not exist (run the pipeline first)")
    evals = sorted(root.glob("eval/*/summary.json"))
    if not evals:
        raise FileNotFoundError(f"{root}/eval holds no <solver>-nfe<N>/summary.json (run `epd evaluate` first)")
    samples = [root / "samples" / p.parent.name for p in evals if (root / "samples" / p.parent.name).is_dir()]
    curves = sorted([*root.glob("tables/*.loss.csv"), *root.glob("tables/*.metrics.csv")])
    return evals, samples, curves


def write_report(results: str | os.PathLike, outdir: str | os.PathLike) -> str:
    """Write summary.md/.csv and the three plots of a results folder into ``outdir``; return the Markdown table.
    Inputs are all read and checked before anything is written."""
    from . import tracking

    evals, samples, curves = find_results(results)
    rows = read_summaries(evals)
    samples = sorted(samples, key=lambda f: [(r.solver, r.nfe) for r in rows].index(parse_run_name(f.name, f)))
    for p in curves:
        read_curve(Path(p))
    for folder in samples:
        sample_images(folder, 1)
    labels = peer_labels(results)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    ref_json = Path(results) / "samples" / REFERENCE / "reference.json"
    table = format_table(rows, json.loads(ref_json.read_text()) if ref_json.is_file() else None, labels)
    atomic_write(out / "summary.md", table.encode())
    atomic_write(out / "summary.csv", format_csv(rows).encode())
    plot_quality(rows, out / "quality_vs_nfe.png", labels)
    plot_curves(curves, out / "curves.png")
    plot_grids(samples, out / "grids.png")
    tracking.log_metrics({f"{m}/{r.solver}" + ("" if r.nfe is None else f"-nfe{r.nfe}"): headline(e)
                          for r in rows for m, e in r.metrics.items() if not math.isnan(headline(e))})
    for name in OUTPUTS:
        tracking.log_artifact(out / name)
    return table


__all__ = ["Row", "find_results", "format_csv", "format_table", "parse_run_name", "peer_labels", "read_summaries",
           "write_report"]
