"""Evaluation: a folder of samples (``samples.csv`` + PNGs, what ``epd sample`` writes) → per-image scores and a
summary.

Metrics, by kind:

- per image, embedded (digit samples): ``label_accuracy`` (1 if the digit classifier reads the requested digit,
  else 0; rows naming no digit are left out), ``label_logprob``, ``realism`` (``epd.rewards``);
- per image, text-to-image: ``hpsv2``, ``pickscore``, ``imagereward``, ``clip``, ``aesthetic``, ``mps``
  (``epd.rewards.t2i``, weights from ``weights``);
- per set: ``fd_digits`` (FD-digits against the training digits, ``epd.metrics.digits``) and ``fid`` (against a
  reference statistics file, Inception weights from ``weights["inception"]``);
- solver accuracy against a ``reference`` folder of the same seeds and conditions (the reference solver's samples,
  ``epd.metrics.reference``): per image ``rms_to_reference`` and ``mode_agreement`` (which needs the ``backbone``
  whose data points it compares), per set ``fd_to_reference`` and ``fd_digits_to_reference``.

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
from .backbones import Backbone
from .io import atomic_write
from .options import Field
from .rewards import REWARDS, load_reward

REFERENCE_METRICS = ("rms_to_reference", "mode_agreement", "fd_to_reference", "fd_digits_to_reference")
SET_METRICS = ("fd_digits", "fid", "fd_to_reference", "fd_digits_to_reference")
METRICS = ("label_accuracy", *REWARDS, *REFERENCE_METRICS[:2], *SET_METRICS)
# What a metric measures: the solver's accuracy (against the reference solution of the same noise), or the model
# and the solver together (against data, or by a scorer); and whether higher is better.
SOLVER_ACCURACY = REFERENCE_METRICS
HIGHER_IS_BETTER = ("label_accuracy", *REWARDS, "mode_agreement")
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
        # every reward is a per-image metric (each loader takes the options it knows)
        self.scorers = {m: load_reward(m, weights=dict(weights), device=device) for m in metrics if m in REWARDS}

    def __call__(self, metric: str, images: torch.Tensor, samples: Sequence[Sample]) -> np.ndarray:
        if metric == "label_accuracy":
            return _label_accuracy(images, samples)
        return self.scorers[metric].score(images, [_prompt(s) for s in samples]).double().numpy()


class _Reference:
    """The reference folder paired with the samples by seed, checked before any work: same seeds, conditions and
    image size; for ``mode_agreement`` the backbone's data points in pixel space."""

    def __init__(self, folder: Path, rows: Sequence[Sample], reference: str | os.PathLike, metrics: Sequence[str],
                 backbone: str | Backbone | None):
        from .metrics.reference import MAX_PIXEL_FD_DIM, pair_with_reference, pixel_data_points

        self.folder = Path(reference)
        self.rows = pair_with_reference(rows, read_manifest(self.folder), names=(str(folder), str(self.folder)))
        first, first_ref = load_images(folder, rows[:1]), load_images(self.folder, self.rows[:1])
        if first.shape != first_ref.shape:
            raise ValueError(f"{folder} holds {tuple(first.shape[1:])} images, the reference {self.folder} "
                             f"{tuple(first_ref.shape[1:])}")
        if "fd_to_reference" in metrics and first[0].numel() > MAX_PIXEL_FD_DIM:
            raise ValueError(f"fd_to_reference fits a pixel-space covariance: {first[0].numel()}-pixel images are "
                             f"too large (at most {MAX_PIXEL_FD_DIM}); use fid")
        if "fd_digits_to_reference" in metrics:
            from .metrics.digits import load_digit_classifier

            side = load_digit_classifier().cfg.resolution
            if tuple(first.shape[1:]) != (1, side, side):
                raise ValueError(f"fd_digits_to_reference reads grey {side}×{side} digit images; {folder} holds "
                                 f"{tuple(first.shape[1:])} images")
        self.data = None
        if "mode_agreement" in metrics:
            if backbone is None:
                backbone = self._backbone()
            if isinstance(backbone, str):
                from .backbones import load_backbone

                backbone = load_backbone(backbone)
            self.data = pixel_data_points(backbone)
            if first[0].numel() != self.data.points.shape[1]:
                raise ValueError(f"{folder} holds {first[0].numel()}-pixel images, {backbone.name}'s data points "
                                 f"have {self.data.points.shape[1]} pixels")

    def _backbone(self) -> Backbone:
        """The backbone that made the reference, as its reference.json records it."""
        from .backbones import load_backbone

        info = self.folder / "reference.json"
        if not info.is_file():
            raise ValueError(f"mode_agreement needs the backbone that made the reference: {info} is missing (`epd "
                             f"sample --solver reference` writes it)")
        meta = json.loads(info.read_text())
        return load_backbone(meta["backbone"], **meta.get("backbone_options", {}))

    def images(self, start: int, stop: int) -> torch.Tensor:
        return load_images(self.folder, self.rows[start:stop])

    def per_image(self, metric: str, images: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
        from .metrics.reference import mode_agreement, rms_to_reference

        if metric == "rms_to_reference":
            return rms_to_reference(images, reference).numpy()
        return mode_agreement(images, reference, self.data).numpy()

    @staticmethod
    def per_set(metric: str, images: torch.Tensor, reference: torch.Tensor) -> float:
        from .metrics.reference import fd_digits_to_reference, fd_to_reference

        return (fd_to_reference if metric == "fd_to_reference" else fd_digits_to_reference)(images, reference)


def _check(metrics: Sequence[str], weights: Mapping[str, Any], reference_stats, reference) -> None:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; expected some of {list(METRICS)}")
    if len(set(metrics)) != len(metrics):
        raise ValueError(f"metrics listed twice: {list(metrics)}")
    if "fid" in metrics and reference_stats is None:
        raise ValueError("fid needs --reference-stats (an .npz with mu and sigma of the reference set's Inception "
                         "features; `epd evaluate --write-reference-stats` makes one)")
    needs = [m for m in metrics if m in REFERENCE_METRICS]
    if needs and reference is None:
        raise ValueError(f"{needs} need a reference folder (--reference: samples of the same seeds and conditions by "
                         f"the reference solver)")


def _summary(values: np.ndarray) -> dict[str, float | int]:
    v = values[~np.isnan(values)]
    if not len(v):   # e.g. label_accuracy on samples that name no digit: null in the JSON, not NaN
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(len(v))}


def evaluate(samples: str | os.PathLike, metrics: Sequence[str], out: str | os.PathLike | None = None, *,
             weights: Mapping[str, Any] | None = None, reference_stats: str | os.PathLike | None = None,
             write_reference_stats: str | os.PathLike | None = None, reference: str | os.PathLike | None = None,
             backbone: str | Backbone | None = None, batch_size: int = 32, device: str | None = None,
             progress: bool = True) -> dict[str, dict[str, float]]:
    """Score the sample folder; returns the summary (and writes OUT/per_image.csv + OUT/summary.json if ``out``).

    ``write_reference_stats`` also saves the set's Inception statistics there (an FID reference). ``reference``: a
    sample folder of the same seeds (it may hold more) and conditions, by the reference solver, for the accuracy
    metrics; ``backbone`` (name or instance) for ``mode_agreement``.
    """
    from .metrics.fid import fid_from_features, inception_features, load_inception, load_reference_stats, \
        save_reference_stats

    weights = dict(weights or {})
    _check(metrics, weights, reference_stats, reference)
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    folder = Path(samples)
    rows = read_manifest(folder)
    fid_reference = load_reference_stats(reference_stats) if "fid" in metrics else None
    paired = (_Reference(folder, rows, reference, metrics, backbone)
              if any(m in REFERENCE_METRICS for m in metrics) else None)
    inception = (load_inception(weights.get("inception"), device or "cpu")
                 if "fid" in metrics or write_reference_stats else None)
    scorers = _Scorers(metrics, weights, device)
    per_image = [m for m in metrics if m not in SET_METRICS]
    set_reference = any(m in SET_METRICS and m in REFERENCE_METRICS for m in metrics)

    columns: dict[str, list[np.ndarray]] = {m: [] for m in per_image}
    all_images, all_reference, features = [], [], []
    for start in tqdm(range(0, len(rows), batch_size), desc="evaluate", unit="batch", disable=not progress):
        batch = rows[start:start + batch_size]
        images = load_images(folder, batch)
        ref_images = None if paired is None else paired.images(start, start + batch_size)
        for m in per_image:
            columns[m].append(paired.per_image(m, images, ref_images) if m in REFERENCE_METRICS
                              else scorers(m, images, batch))
        if "fd_digits" in metrics or set_reference:
            all_images.append(images)
        if set_reference:
            all_reference.append(ref_images)
        if inception is not None:
            features.append(inception_features([images], inception))

    values = {m: np.concatenate(v) for m, v in columns.items()}
    summary: dict[str, dict[str, float]] = {m: _summary(v) for m, v in values.items()}
    if "fd_digits" in metrics:
        from .metrics.digits import fd_digits, train_digit_stats

        summary["fd_digits"] = {"value": fd_digits(torch.cat(all_images), train_digit_stats()),
                                "n": len(rows)}
    for m in ("fd_to_reference", "fd_digits_to_reference"):
        if m in metrics:
            summary[m] = {"value": paired.per_set(m, torch.cat(all_images), torch.cat(all_reference)),
                          "n": len(rows)}
    if "fid" in metrics:
        summary["fid"] = {"value": fid_from_features(torch.cat(features), fid_reference), "n": len(rows)}
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
