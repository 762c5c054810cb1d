"""The digit feature network and the two embedded quality measures built on it.

- **FD-digits** (the FID analogue): Fréchet distance between Gaussians fitted to the classifier's penultimate
  features (64-d, after ReLU, as FID takes Inception's pool features) of two image sets.
- **Label accuracy** (the CLIP-score analogue): how often the classifier reads the requested digit in a sample.

The classifier is a small CNN trained on the train split of the digits (``epd.data``); its weights ship in
``data/weights/digit-classifier.*`` and ``epd train-backbone --what classifier`` remakes them. Every function here
takes images as pixels in [0, 1], float ``[B, 1, 8, 8]`` (what ``Backbone.to_pixels`` returns), or the uint8 images
``Backbone.decode`` returns.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..data import WEIGHTS_DIR, digit_split
from ..io import WeightsError, check_state_dict, load_weights, weight_paths
from .frechet import frechet_distance, gaussian_stats

KIND = "digit-classifier"
MAKE = "epd train-backbone --what classifier"


@dataclass(frozen=True)
class ClassifierConfig:
    """The architecture (stored in the weights' JSON): three 3×3 convolutions, two 2×2 max-pools, two linears."""

    resolution: int = 8
    channels: tuple[int, int, int] = (32, 64, 128)
    feature_dim: int = 64
    num_classes: int = 10
    dropout: float = 0.3

    @classmethod
    def from_json(cls, data: dict) -> "ClassifierConfig":
        try:
            cfg = cls(**{**data, "channels": tuple(data["channels"])})
            ok = len(cfg.channels) == 3 and all(isinstance(c, int) and c > 0 for c in cfg.channels)
        except (TypeError, KeyError) as e:
            raise WeightsError(f"digit-classifier architecture config is malformed: {e}") from None
        if not ok or not isinstance(cfg.feature_dim, int) or cfg.feature_dim < 1:
            raise WeightsError(f"digit-classifier architecture config is malformed: {data}")
        return cfg

    def to_json(self) -> dict:
        return {**asdict(self), "channels": list(self.channels)}


class DigitClassifier(nn.Module):
    """Pixels in [0, 1], [B, 1, 8, 8] → logits [B, 10]; ``features`` gives the penultimate activations."""

    def __init__(self, cfg: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.cfg = cfg
        c1, c2, c3 = cfg.channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.fc = nn.Linear(c3 * (cfg.resolution // 4) ** 2, cfg.feature_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        h = 2 * pixels - 1                      # centre the input; training used the same map
        h = F.relu(self.conv1(h))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(pixels)))


def default_weights() -> Path:

    return WEIGHTS_DIR / "digit-classifier"


def load_digit_classifier(path: str | os.PathLike | None = None) -> DigitClassifier:
    """The trained classifier in eval mode, gradients off; refuses missing, corrupt or mismatched files.

    Loaded once per path and process (and re-read if the file changes): metrics and rewards call this often.
    """
    st, js = weight_paths(path or default_weights())
    stamps = tuple(f.stat().st_mtime_ns if f.exists() else None for f in (st, js))
    return _load_cached(str(st.resolve()), stamps)


@lru_cache(maxsize=4)
def _load_cached(path: str, stamps: tuple) -> DigitClassifier:
    tensors, header = load_weights(path, kind=KIND, make=MAKE)
    model = DigitClassifier(ClassifierConfig.from_json(header["config"]))
    check_state_dict(tensors, model, Path(path))
    model.load_state_dict(tensors)
    model.header = header
    return model.eval().requires_grad_(False)


def as_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W] / [B, 1, H, W] (``decode``) or float [B, 1, H, W] in [0, 1] (``to_pixels``) → float32 pixels."""
    if images.dtype == torch.uint8:
        images = images.float() / 255
        if images.ndim == 3:
            images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected digit images [B, 1, H, W] (or uint8 [B, H, W]), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected float pixels in [0, 1] or uint8, got {images.dtype}")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise ValueError(f"pixels must lie in [0, 1] (use Backbone.to_pixels), got range [{lo:.3f}, {hi:.3f}]")
    return images.float()


def _batched(fn, pixels: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])


def digit_features(images: torch.Tensor, classifier: DigitClassifier | None = None) -> torch.Tensor:
    """Penultimate features [B, feature_dim] of the classifier."""
    clf = classifier or load_digit_classifier()
    return _batched(clf.features, as_pixels(images))


def digit_log_probs(images: torch.Tensor, classifier: DigitClassifier | None = None) -> torch.Tensor:
    """log p(label | image), [B, 10]."""
    clf = classifier or load_digit_classifier()
    return _batched(lambda p: clf(p).log_softmax(-1), as_pixels(images))


def fd_digits_stats(images: torch.Tensor, classifier: DigitClassifier | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Feature mean and covariance of an image set (reusable against many others)."""
    return gaussian_stats(digit_features(images, classifier))


def fd_digits(images_a: torch.Tensor, images_b: torch.Tensor | tuple[np.ndarray, np.ndarray],
              classifier: DigitClassifier | None = None) -> float:
    """FD-digits between two image sets (or an image set and precomputed stats), lower is better, ≥ 0."""
    stats_b = images_b if isinstance(images_b, tuple) else fd_digits_stats(images_b, classifier)
    return frechet_distance(*fd_digits_stats(images_a, classifier), *stats_b)


@lru_cache(maxsize=1)
def train_digit_stats() -> tuple[np.ndarray, np.ndarray]:
    """The FD-digits reference: feature statistics of the training digits under the shipped classifier (computed
    once per process)."""
    return fd_digits_stats(data_pixels("train")[0])


def label_hits(images: torch.Tensor, labels: torch.Tensor, classifier: DigitClassifier | None = None) -> torch.Tensor:
    """Per image, float64: 1 if the classifier reads its label, 0 if not, NaN for label −1 (unconditional)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.shape != (len(images),):
        raise ValueError(f"need one label per image, got {tuple(labels.shape)} for {len(images)} images")
    hits = (digit_log_probs(images, classifier).argmax(-1) == labels).double()
    return torch.where(labels >= 0, hits, torch.nan)


def label_accuracy(images: torch.Tensor, labels: torch.Tensor, classifier: DigitClassifier | None = None) -> float:
    """Fraction of images the classifier reads as their label (rows with label −1, unconditional, are skipped)."""
    hits = label_hits(images, labels, classifier)
    if bool(hits.isnan().all()):
        raise ValueError("label accuracy needs at least one labelled image")
    return float(hits.nanmean())


def data_pixels(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The digits of one side of the split (``"train"`` or ``"held_out"``) as pixels in [0, 1], and their labels."""

    s = digit_split()
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    images, labels = (s.train_images, s.train_labels) if split == "train" else (s.held_out_images, s.held_out_labels)
    return ((images + 1) / 2).float(), labels
