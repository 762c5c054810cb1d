"""Evaluation: a folder of samples (``samples.csv`` + PNGs, what ``epd sample`` writes) → per-image scores and a
summary.

Metrics, by kind:

- per image, embedded (digit samples): ``label_accuracy`` (1 if the digit classifier reads the requested digit,
  else 0; rows naming no digit are left out), ``label_logprob``, ``realism`` (``epd.rewards``);
- per image, text-to-image: ``hpsv2``, ``pickscore``, ``imagereward``, ``clip``, ``aesthetic``, ``mps``
  (``epd.rewards.t2i``, weights from ``weights``);
- per set: ``fd_digits`` (FD-digits against the training digits, ``epd.metrics.digits``) and ``fid`` (against a
  reference statistics file, Inception weights from ``weights["inception"]``).

Writes ``OUT/per_image.csv`` (seed, label, prompt, path, then one column per per-image metric) and
``OUT/summary.json`` (``{metric: {"mean", "std", "n"}}`` per image — std over images, ddof 0 — and
``{metric: {"value", "n"}}`` per set). Everything is loaded and checked before anything is computed, and both files
are written (atomically) only at the end: a bad input leaves nothing behind.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import tracking
from .io import atomic_write
from .options import Field
from .rewards.t2i import SCORERS

DIGIT_METRICS = ("label_accuracy", "label_logprob", "realism")
SET_METRICS = ("fd_digits", "fid")
METRICS = (*DIGIT_METRICS, *SCORERS, *SET_METRICS)
MANIFEST_COLUMNS = ("seed", "label", "prompt", "path")


@dataclass(frozen=True)
class EvaluateOptions:
    """Evaluation (config section ``evaluate``): which metrics score each sample folder."""

    metrics: Annotated[list[Literal[METRICS]], Field(min_length=1, description="metrics to compute")] = \
        field(default_factory=lambda: ["fd_digits", "label_accuracy"])
    reference_stats: Annotated[str | None, Field(description="fid: .npz with mu and sigma of the reference set's "
                                                             "Inception features")] = None
    batch: Annotated[int, Field(ge=1, description="images per scoring batch")] = 32
    device: Annotated[str | None, Field(description="scorers' device (none: cuda if there is one, else cpu)")] = None

    def __post_init__(self):
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"metrics lists a metric twice: {self.metrics}")


@dataclass(frozen=True)
class Sample:
    seed: int
    label: int | None
    prompt: str
    path: str   # relative to the samples folder


def read_manifest(samples: str | os.PathLike) -> list[Sample]:
    """The rows of ``SAMPLES/samples.csv``; every PNG it names must exist."""
    folder = Path(samples)
    manifest = folder / "samples.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} missing: evaluate reads the samples.csv that `epd sample` writes beside "
                                f"its PNGs (not with --grid)")
    with manifest.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{manifest}: columns {missing} missing (expected {list(MANIFEST_COLUMNS)})")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{manifest} lists no samples")
    out = []
    for i, r in enumerate(rows, start=2):
        try:
            out.append(Sample(int(r["seed"]), int(r["label"]) if r["label"].strip() else None, r["prompt"], r["path"]))
        except ValueError:
            raise ValueError(f"{manifest}, line {i}: seed and label must be integers, got {r}") from None
        if not (folder / r["path"]).is_file():
            raise FileNotFoundError(f"{manifest}, line {i}: image {folder / r['path']} missing")
    return out


def load_images(folder: Path, samples: Sequence[Sample]) -> torch.Tensor:
    """uint8 [b, C, H, W] (C = 1 for grey, 3 for colour); all images of a set must share a size and mode."""
    arrays = []
    for s in samples:
        with Image.open(folder / s.path) as im:
            arr = np.asarray(im.convert("L") if im.mode in ("L", "I", "1") else im.convert("RGB"))
        arrays.append(arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"{folder}: images differ in size or mode {sorted(shapes)}; evaluate one sample set at a time")
    return torch.from_numpy(np.stack(arrays))


def _prompt(s: Sample) -> str:
    """The text a reward reads: the prompt, or for a labelled digit sample the label in words the rewards parse."""
    return s.prompt if s.prompt or s.label is None else f"a handwritten {s.label}"


def _label_accuracy(images: torch.Tensor, samples: Sequence[Sample]) -> np.ndarray:
    from .data import labels_from_prompts
    from .metrics.digits import label_hits

    labels = torch.tensor([s.label if s.label is not None else int(labels_from_prompts([s.prompt])[0])
                           for s in samples])
    return label_hits(images, labels).numpy()


class _Scorers:
    """Loads every requested per-image scorer up front (missing weights fail before any work)."""

    def __init__(self, metrics: Sequence[str], weights: Mapping[str, Any], device: str | None):
        from .rewards import load_reward

        self.scorers = {}
        for m in metrics:
            if m in SCORERS:
                self.scorers[m] = load_reward(m, weights=dict(weights), device=device)
            elif m in ("label_logprob", "realism"):
                self.scorers[m] = load_reward(m)

    def __call__(self, metric: str, images: torch.Tensor, samples: Sequence[Sample]) -> np.ndarray:
        if metric == "label_accuracy":
            return _label_accuracy(images, samples)
        return self.scorers[metric].score(images, [_prompt(s) for s in samples]).double().numpy()


def _check(metrics: Sequence[str], weights: Mapping[str, Any], reference_stats) -> None:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; expected some of {list(METRICS)}")
    if len(set(metrics)) != len(metrics):
        raise ValueError(f"metrics listed twice: {list(metrics)}")
    if "fid" in metrics and reference_stats is None:
        raise ValueError("fid needs --reference-stats (an .npz with mu and sigma of the reference set's Inception "
                         "features; `epd evaluate --write-reference-stats` makes one)")


def _summary(values: np.ndarray) -> dict[str, float | int]:
    v = values[~np.isnan(values)]
    if not len(v):   # e.g. label_accuracy on samples that name no digit: null in the JSON, not NaN
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(len(v))}


def evaluate(samples: str | os.PathLike, metrics: Sequence[str], out: str | os.PathLike | None = None, *,
             weights: Mapping[str, Any] | None = None, reference_stats: str | os.PathLike | None = None,
             write_reference_stats: str | os.PathLike | None = None, batch_size: int = 32,
             device: str | None = None, progress: bool = True) -> dict[str, dict[str, float]]:
    """Score the sample folder; returns the summary (and writes OUT/per_image.csv + OUT/summary.json if ``out``).
    ``write_reference_stats`` also saves the set's Inception statistics there (an FID reference)."""
    from .metrics.fid import fid_from_features, inception_features, load_inception, load_reference_stats, \
        save_reference_stats

    weights = dict(weights or {})
    _check(metrics, weights, reference_stats)
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    folder = Path(samples)
    rows = read_manifest(folder)
    reference = load_reference_stats(reference_stats) if "fid" in metrics else None
    inception = (load_inception(weights.get("inception"), device or "cpu")
                 if "fid" in metrics or write_reference_stats else None)
    scorers = _Scorers(metrics, weights, device)
    per_image = [m for m in metrics if m not in SET_METRICS]

    columns: dict[str, list[np.ndarray]] = {m: [] for m in per_image}
    digit_pixels, features = [], []
    for start in tqdm(range(0, len(rows), batch_size), desc="evaluate", unit="batch", disable=not progress):
        batch = rows[start:start + batch_size]
        images = load_images(folder, batch)
        for m in per_image:
            columns[m].append(scorers(m, images, batch))
        if "fd_digits" in metrics:
            digit_pixels.append(images)
        if inception is not None:
            features.append(inception_features([images], inception))

    values = {m: np.concatenate(v) for m, v in columns.items()}
    summary: dict[str, dict[str, float]] = {m: _summary(v) for m, v in values.items()}
    if "fd_digits" in metrics:
        from .metrics.digits import fd_digits, train_digit_stats

        summary["fd_digits"] = {"value": fd_digits(torch.cat(digit_pixels), train_digit_stats()),
                                "n": len(rows)}
    if "fid" in metrics:
        summary["fid"] = {"value": fid_from_features(torch.cat(features), reference), "n": len(rows)}
    if write_reference_stats:
        save_reference_stats(torch.cat(features), write_reference_stats)
    if out is not None:
        _write(Path(out), rows, values, summary)
    return summary


def _write(out: Path, rows: Sequence[Sample], values: Mapping[str, np.ndarray], summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*MANIFEST_COLUMNS, *values])
    for i, s in enumerate(rows):
        w.writerow([s.seed, "" if s.label is None else s.label, s.prompt, s.path,
                    *("" if np.isnan(v[i]) else f"{v[i]:.6g}" for v in values.values())])
    atomic_write(out / "per_image.csv", buf.getvalue().encode())
    atomic_write(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    flat = {f"{m}_mean" if "mean" in s else m: s.get("mean", s.get("value")) for m, s in summary.items()}
    tracking.log_metrics({k: v for k, v in flat.items() if v is not None})
    tracking.log_artifact(out / "per_image.csv")
    tracking.log_artifact(out / "summary.json")
