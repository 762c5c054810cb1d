"""Embedded rewards on digit images, from the digit classifier (``epd.metrics.digits``); ranges in ``__init__``."""
from __future__ import annotations

import os

import torch

from ..data import labels_from_prompts
from ..metrics.digits import as_pixels, data_pixels, digit_features, digit_log_probs, load_digit_classifier


def _check(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, one per image")
    if len(prompts) != len(images):
        raise ValueError(f"need one prompt per image, got {len(prompts)} prompts for {len(images)} images")
    return as_pixels(images)


class LabelLogProb:
    """log p(digit named by the prompt | image) in (−∞, 0]; a prompt naming no digit scores max_c log p(c | image),
    in [−ln 10, 0]. The label accuracy's smooth counterpart: it also says how sure the classifier is."""

    name = "label_logprob"
    range = (float("-inf"), 0.0)

    def __init__(self, classifier_path: str | os.PathLike | None = None):
        self.classifier = load_digit_classifier(classifier_path)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = _check(images, prompts)
        labels = labels_from_prompts(list(prompts))
        logp = digit_log_probs(pixels, self.classifier).double()
        named = logp.gather(1, labels.clamp(min=0)[:, None])[:, 0]
        return torch.where(labels >= 0, named, logp.max(1).values).clamp(max=0.0)


class Realism:
    """−d / d_ref in (−∞, 0]: d the distance from the image's classifier features to the nearest training digit's,
    d_ref its median over the held-out digits (so a held-out digit scores −1 at the median, a training digit 0).
    The prompt is ignored: this says "looks like a real digit", ``label_logprob`` says "which one"."""

    name = "realism"
    range = (float("-inf"), 0.0)

    def __init__(self, classifier_path: str | os.PathLike | None = None):
        self.classifier = load_digit_classifier(classifier_path)
        self.train_features = digit_features(data_pixels("train")[0], self.classifier).double()
        self.d_ref = float(self.nearest(data_pixels("held_out")[0]).median())

    def nearest(self, pixels: torch.Tensor) -> torch.Tensor:
        """Feature-space distance of each image to its nearest training digit, [B] float64."""
        f = digit_features(pixels, self.classifier).double()
        return torch.cdist(f, self.train_features).min(1).values

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return -self.nearest(_check(images, prompts)) / self.d_ref
