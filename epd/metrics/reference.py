"""Solver accuracy: a sample set against the reference solution of the same seeds and conditions.

A fast solver approximates the solution of the diffusion ODE; the reference (:mod:`epd.solvers.reference`, a
converged DPM-Solver++(3M) run) is that solution for the same noise. These metrics measure the solver, not the
model: a smoothing solver can move its samples nearer to real data (and score better on FD-digits) while moving them
away from the ODE solution it approximates.

- ``fd_to_reference`` (set): Fréchet distance between Gaussians fitted to the two sets in pixel space ([0, 1]).
  Zero when the sets have the same mean and covariance, whatever the pairing; its floor is set by the pairs'
  differences, not by finite-sample noise, because both sets come from the same noise.
- ``fd_digits_to_reference`` (set): the same in the digit classifier's feature space (digit backbones).
- ``rms_to_reference`` (per image): RMS pixel difference ([0, 1] units) to the reference image of the same seed;
  half the RMS in the backbones' [−1, 1] state units where nothing is clipped.
- ``mode_agreement`` (per image): 1 if the sample and the reference image of the same seed lie nearest the same
  data point of the backbone (``gmm-digits``: the same mixture component; ``unet-digits``: the same training digit),
  else 0. The nearest point of a pixel image p is that of the centred state 2p − 1 − mean (a shift and a scale
  keep the nearest point), so it is found among the data points mapped to pixels.

Images are what sample folders hold: uint8 8-bit PNGs, one grey level = 1/255. Rounding moves each pixel by at most
1/510, but it does not add independent noise of RMS 1/(255·√12) to each side: two images closer than a grey level
mostly round alike, and a pixel pair |δ| apart rounds one level apart with probability about 255·|δ|, so small
pixel errors δ show as an RMS of about sqrt(mean |δ| / 255) (rounding inflates errors far below a grey level, leaves
errors of several grey levels as they are, and pixels clipped on both sides agree exactly). The floor this sets is
the reference against itself solved with twice the steps (``epd.benchmark`` reports it as the reference's row;
docs/results/2026-11-27-solver-accuracy.md, seeds 0-3999):

- ``gmm-digits``, 512 against 1024 steps: state RMS 2e-5; rms_to_reference 1e-5 (unrounded 2e-6: one pixel in
  ~3000 rounds a grey level apart), fd_to_reference 4e-9, mode_agreement 1;
- ``unet-digits``, 128 against 256 steps: state RMS 4e-4; rms_to_reference 4e-4, fd_to_reference 6e-7,
  mode_agreement 0.998 and 0.999 on the two seed sets, as in state space before rounding;
- the most accurate solvers at NFE 5 score rms_to_reference 0.02-0.04, fd_to_reference 0.002-0.004 and
  mode_agreement 0.84-0.94: rounding is negligible against what separates solvers.

Rounding can also flip the nearest data point of an image within a rounding error of the boundary between two
points; on the gmm-digits reference it flipped none of 4000.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from ..backbones.base import Backbone, DataPoints
from .digits import fd_digits
from .frechet import frechet_distance, gaussian_stats

# A pixel-space Fréchet distance needs a D×D covariance: fine for the digit backbones (D = 64), not for
# text-to-image sizes (use FID there).
MAX_PIXEL_FD_DIM = 4096

Stats = tuple[np.ndarray, np.ndarray]


def as_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, H, W] / [B, C, H, W] or float pixels in [0, 1] → float64 [B, C, H, W] in [0, 1]."""
    if images.dtype == torch.uint8:
        images = images.double() / 255
    elif not images.is_floating_point():
        raise ValueError(f"expected uint8 images or float pixels in [0, 1], got {images.dtype}")
    else:
        lo, hi = float(images.min()), float(images.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"float pixels must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
        images = images.double()
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4:
        raise ValueError(f"expected images [B, C, H, W] (or grey [B, H, W]), got shape {tuple(images.shape)}")
    return images


def _same_shape(images: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = as_pixels(images), as_pixels(reference)
    if a.shape != b.shape:
        raise ValueError(f"the samples are {tuple(a.shape)}, the reference images {tuple(b.shape)}: pair them by seed")
    return a, b


def pixel_stats(images: torch.Tensor) -> Stats:
    """Mean and covariance of an image set in pixel space (reusable against many sets)."""
    pixels = as_pixels(images).flatten(1)
    if pixels.shape[1] > MAX_PIXEL_FD_DIM:
        raise ValueError(f"a pixel-space Fréchet distance of {pixels.shape[1]}-pixel images needs a "
                         f"{pixels.shape[1]}² covariance; it is for small images (≤ {MAX_PIXEL_FD_DIM} pixels), "
                         f"use fid for large ones")
    return gaussian_stats(pixels)


def fd_to_reference(images: torch.Tensor, reference: torch.Tensor | Stats) -> float:
    """Pixel-space Fréchet distance between the samples and the reference images (or their :func:`pixel_stats`)."""
    ref = reference if isinstance(reference, tuple) else pixel_stats(reference)
    return frechet_distance(*pixel_stats(images), *ref)


def fd_digits_to_reference(images: torch.Tensor, reference: torch.Tensor | Stats, classifier=None) -> float:
    """FD-digits between the samples and the reference images (or their ``fd_digits_stats``)."""
    return fd_digits(images, reference, classifier)


def rms_to_reference(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per image [B], float64: RMS pixel difference to the reference image in the same row, in [0, 1] units."""
    a, b = _same_shape(images, reference)
    return ((a - b) ** 2).flatten(1).mean(1).sqrt()


def pixel_data_points(backbone: Backbone) -> DataPoints:
    """The backbone's data points as pixel images (flattened), what :func:`mode_agreement` compares against."""
    if backbone.data is None:
        raise ValueError(f"mode_agreement needs a backbone that models data points (gmm-digits, unet-digits), "
                         f"got {backbone.name!r}")
    data = backbone.data
    return DataPoints(backbone.to_pixels(data.points.reshape(-1, *backbone.shape)).double(), data.labels)


def mode_agreement(images: torch.Tensor, reference: torch.Tensor, data: DataPoints) -> torch.Tensor:
    """Per image [B], float64: 1 if the sample and the reference image in the same row are nearest the same data
    point (``data`` in pixel space, :func:`pixel_data_points`), else 0."""
    a, b = _same_shape(images, reference)
    if a[0].numel() != data.points.shape[1]:
        raise ValueError(f"images have {a[0].numel()} pixels, the data points {data.points.shape[1]}: "
                         f"another backbone or resolution?")
    return (data.nearest(a) == data.nearest(b)).double()


class Row(Protocol):
    seed: int
    label: int | None
    prompt: str


def pair_with_reference(samples: Sequence[Row], reference: Sequence[Row], names: tuple[str, str] = ("samples",
                        "reference")) -> list[Row]:
    """The reference row of each sample's seed, in the samples' order; refuses, naming the first mismatch, a seed
    listed twice, a seed the reference lacks, or a seed whose label or prompt differs. The reference may hold more
    seeds than the samples (e.g. one reference folder for several sample sets)."""
    for name, rows in zip(names, (samples, reference)):
        seen: set[int] = set()
        for r in rows:
            if r.seed in seen:
                raise ValueError(f"{name}: seed {r.seed} listed twice")
            seen.add(r.seed)
    by_seed = {r.seed: r for r in reference}
    paired = []
    for s in samples:
        r = by_seed.get(s.seed)
        if r is None:
            raise ValueError(f"seed {s.seed} of {names[0]} is missing from {names[1]} (which has {len(by_seed)} "
                             f"seeds): sample the reference with the same seeds")
        for field in ("label", "prompt"):
            if getattr(s, field) != getattr(r, field):
                raise ValueError(f"seed {s.seed}: {field} {getattr(s, field)!r} in {names[0]}, "
                                 f"{getattr(r, field)!r} in {names[1]}: the reference must have the same conditions")
        paired.append(r)
    return paired


__all__ = ["MAX_PIXEL_FD_DIM", "as_pixels", "fd_digits_to_reference", "fd_to_reference", "mode_agreement",
           "pair_with_reference", "pixel_data_points", "pixel_stats", "rms_to_reference"]
