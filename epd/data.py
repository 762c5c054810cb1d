"""The one place the embedded data's train / held-out split and the shipped weights' folder are defined.

The split is stratified by label, 80 / 20, from a fixed seed: the trained backbone and the digit classifier learn on
``train``, and every quality figure that needs unseen digits (classifier accuracy, the FD-digits floor) uses
``held_out``. Changing it changes what the shipped weights were trained on, so the weights' JSON records it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.2

# data/weights at the repository root (the package is installed editable, see .ci/setup); EPD_WEIGHTS_DIR overrides.
WEIGHTS_DIR = Path(os.environ.get("EPD_WEIGHTS_DIR", Path(__file__).resolve().parent.parent / "data" / "weights"))


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
    from .backbones.gmm import load_digit_images

    images, labels = load_digit_images()
    tr, ho = split_indices(labels.numpy())
    return DigitSplit(images[tr], labels[tr], images[ho], labels[ho], tr, ho)
