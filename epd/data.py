"""Inputs every stage reads: the embedded digit data and its train / held-out split, seed specs, label lists and
prompt files. Each parser checks its input completely and names the problem (the file and line, the part of the
spec) before any work starts.

The split is stratified by label, 80 / 20, from a fixed seed: the trained backbone and the digit classifier learn on
``train``, and every quality figure that needs unseen digits (classifier accuracy, the FD-digits floor) uses
``held_out``. Changing it changes what the shipped weights were trained on, so the weights' JSON records it.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.2
MAX_SEEDS = 1_000_000          # seeds in one spec: a larger run is sharded, not listed in one process
MAX_SEED = 2**63 - 1           # torch.Generator.manual_seed takes a signed 64-bit seed

# data/weights at the repository root (the package is installed editable, see .ci/setup); EPD_WEIGHTS_DIR overrides.
WEIGHTS_DIR = Path(os.environ.get("EPD_WEIGHTS_DIR", Path(__file__).resolve().parent.parent / "data" / "weights"))

# Number words understood in prompts, besides the digits themselves.
_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_PROMPT_RE = re.compile(r"\b([0-9]|" + "|".join(_WORDS) + r")\b", re.IGNORECASE)


# -- the embedded digits -------------------------------------------------------------------------------------------

def load_digit_images(resolution: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 scikit-learn digits as [1797, 1, R, R] float64 in [−1, 1], and their labels [1797]."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float64).unsqueeze(1) / 8.0 - 1.0  # 0..16 → [−1, 1]
    if resolution != 8:
        if resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
        images = torch.nn.functional.interpolate(images, size=(resolution, resolution), mode="bilinear",
                                                 align_corners=False).clamp(-1, 1)
    return images, torch.tensor(digits.target, dtype=torch.long)


@dataclass(frozen=True)
class DigitSplit:
    """Images [N, 1, 8, 8] float64 in [−1, 1] (not centred) and labels [N], for each side of the split."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    held_out_images: torch.Tensor
    held_out_labels: torch.Tensor
    train_index: np.ndarray
    held_out_index: np.ndarray

    def describe(self) -> dict:
        """What a weight file records about the data it was trained on."""
        return {"dataset": "sklearn.datasets.load_digits", "seed": SPLIT_SEED, "held_out_fraction": HELD_OUT_FRACTION,
                "stratified": True, "train": int(len(self.train_index)), "held_out": int(len(self.held_out_index))}


def split_indices(labels: np.ndarray, held_out_fraction: float = HELD_OUT_FRACTION,
                  seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, held-out) index arrays, each sorted; the same labels and seed give the same split."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(held_out_fraction * len(idx)))
        held.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def digit_split() -> DigitSplit:
    """The scikit-learn digits (8×8), split into train and held-out."""
    images, labels = load_digit_images()
    tr, ho = split_indices(labels.numpy())
    return DigitSplit(images[tr], labels[tr], images[ho], labels[ho], tr, ho)


# -- seeds, labels, prompts ----------------------------------------------------------------------------------------

def seed_count(spec: str) -> int:
    """How many seeds ``spec`` names, checked as :func:`parse_seeds` does but without listing them."""
    return len(_seed_ranges(spec))


def _seed_ranges(spec: str) -> range | list[int]:
    if not isinstance(spec, str):
        raise ValueError(f"a seed spec is a string such as '0-63' or '1,5,9', got {spec!r}")
    parts = [p.strip() for p in spec.split(",")]
    if not spec.strip() or any(not p for p in parts):
        raise ValueError(f"seed spec {spec!r} has an empty part; use e.g. '0-63' or '1,5,9'")
    ranges = []
    for part in parts:
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if m is None:
            raise ValueError(f"bad seed spec {part!r} in {spec!r}; use e.g. '0-63' or '1,5,9' (non-negative integers)")
        lo = int(m[1])
        hi = int(m[2]) if m[2] is not None else lo
        if hi < lo:
            raise ValueError(f"seed range {part!r} runs backwards; write {hi}-{lo}")
        if hi > MAX_SEED:
            raise ValueError(f"seed {hi} in {spec!r} exceeds the largest seed {MAX_SEED}")
        ranges.append(range(lo, hi + 1))
    total = sum(len(r) for r in ranges)
    if total > MAX_SEEDS:
        raise ValueError(f"seed spec {spec!r} names {total:,} seeds; one run takes at most {MAX_SEEDS:,} "
                         f"(run a larger set as several runs over parts of the range)")
    ordered = sorted(ranges, key=lambda r: r.start)
    for a, b in zip(ordered, ordered[1:]):
        if b.start < a.stop:
            raise ValueError(f"seed spec {spec!r} names seed {b.start} twice; every seed may appear once")
    return ranges[0] if len(ranges) == 1 else [s for r in ranges for s in r]


def parse_seeds(spec: str) -> list[int]:
    """``"0-63"``, ``"1,5,9"`` or ``"0-3,10,20-21"`` → the seeds in the given order (ranges inclusive).

    Refused with a message naming the part: anything but non-negative integers and ranges, a backwards range
    (``5-1``), a seed named twice, more than :data:`MAX_SEEDS` seeds."""
    return list(_seed_ranges(spec))


def parse_labels(spec: str | list[int]) -> list[int]:
    """``"0,1,2"`` (or a list) → class labels 0–9, cycled over the seeds by whoever uses them."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        labels = [int(str(v).strip()) for v in items]
    except ValueError:
        raise ValueError(f"labels {spec!r} must be comma-separated integers, e.g. 0,1,2") from None
    if not labels:
        raise ValueError("the label list is empty")
    bad = [v for v in labels if not 0 <= v <= 9]
    if bad:
        raise ValueError(f"labels must be digits 0-9, got {bad}")
    return labels


def labels_from_prompts(prompts: list[str]) -> torch.Tensor:
    """"a handwritten 3" / "the digit seven" → 3 / 7. A prompt naming no digit, or "", is unconditional (−1)."""
    labels = []
    for p in prompts:
        found = {m.lower() for m in _PROMPT_RE.findall(p)}
        values = {int(f) if f.isdigit() else _WORDS.index(f) for f in found}
        if len(values) > 1:
            raise ValueError(f"prompt {p!r} names several digits {sorted(values)}; name at most one")
        labels.append(values.pop() if values else -1)
    return torch.tensor(labels, dtype=torch.long)


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a .txt file (one per line, blank lines skipped) or a .csv with a ``text`` column.

    Refused, naming the file (and line): a missing file, a folder, text that is not UTF-8, no prompt at all."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {p} {'is a folder' if p.is_dir() else 'does not exist'}")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"prompt file {p}, line {line}: not UTF-8 text (byte {raw[e.start]:#04x}); save it as "
                         f"UTF-8") from None
    if p.suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None or "text" not in reader.fieldnames:
            raise ValueError(f"prompt file {p}: a prompt CSV needs a 'text' column, found {reader.fieldnames}")
        prompts = [row["text"] for row in reader]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {p} lists no prompts")
    return prompts


__all__ = ["DigitSplit", "MAX_SEEDS", "WEIGHTS_DIR", "digit_split", "labels_from_prompts", "load_digit_images",
           "parse_labels", "parse_seeds", "read_prompts", "seed_count", "split_indices"]
