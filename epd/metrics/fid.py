"""FID: Fréchet distance between Inception-v3 pool features (2048-d) of generated images and a reference set.

Features come from torch-fidelity's ``FeatureExtractorInceptionV3`` (the TF-Inception port that torchmetrics' FID
also uses: bilinear resize to 299 as TF 1.x did, the 2015-12-05 weights), loaded from a local file. torch-fidelity
would read that file with weights_only=False; we hand it the state dict we read with weights_only=True (or from
safetensors), so no pickle code runs. The reference is a statistics file, ``.npz`` with ``mu`` [2048] and
``sigma`` [2048, 2048] (read with ``allow_pickle=False``), which ``save_reference_stats`` writes; the distance is
:func:`epd.metrics.frechet.frechet_distance`.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..io import atomic_write, load_checkpoint, require
from .frechet import frechet_distance, gaussian_stats

SOURCE = ("weights-inception-2015-12-05-6726825d.pth from "
          "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/")
FEATURE_DIM = 2048


@contextlib.contextmanager
def _safe_torch_load(path: Path):
    """Make torch-fidelity's module-level ``torch.load`` return our safely read state dict while it builds."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    state = load_checkpoint(path, "fid (Inception)")

    class _Torch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def load(*args, **kwargs):
            return state

    real = fe.torch
    fe.torch = _Torch()
    try:
        yield
    finally:
        fe.torch = real


def load_inception(weights: str | os.PathLike | None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """torch-fidelity's Inception-v3 feature extractor (2048-d pool features) with weights from a local file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = require(weights, "fid (Inception-v3 weights)", SOURCE)
    with _safe_torch_load(path):
        model = FeatureExtractorInceptionV3("inception-v3-compat", [str(FEATURE_DIM)],
                                            feature_extractor_weights_path=str(path))
    return model.to(device)


def inception_features(images: Iterable[torch.Tensor], model: torch.nn.Module) -> torch.Tensor:
    """Pool features [N, 2048] (float64, CPU) of uint8 image batches [b, 3, H, W] (grey images are repeated)."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for batch in images:
            if batch.dtype != torch.uint8:
                raise ValueError(f"FID takes uint8 images (what the PNGs hold), got {batch.dtype}")
            if batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)
            out.append(model(batch.to(device))[0].double().cpu())
    return torch.cat(out)


def save_reference_stats(features: torch.Tensor | np.ndarray, path: str | os.PathLike) -> Path:
    """Write ``mu`` and ``sigma`` of [N, D] features to an .npz (atomically)."""
    mu, sigma = gaussian_stats(features)
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())
    return path


def load_reference_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``mu`` [D] and ``sigma`` [D, D] from an .npz; a missing, pickled or malformed file is refused by name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID reference statistics missing: {path} (write them with "
                                f"`epd evaluate --samples REFERENCE_DIR --write-reference-stats {path} ...`)")
    try:
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    except KeyError as e:
        raise ValueError(f"{path}: reference statistics need arrays 'mu' and 'sigma', missing {e}") from None
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not a plain .npz of mu and sigma (pickled or corrupt?): {e}") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path}: mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu or sigma contains NaN or inf")
    return mu, sigma


def fid_from_features(features: torch.Tensor | np.ndarray, reference: tuple[np.ndarray, np.ndarray]) -> float:
    """FID of [N, D] features against reference (mu, sigma)."""
    mu, sigma = gaussian_stats(features)
    if mu.shape != reference[0].shape:
        raise ValueError(f"features are {mu.shape[0]}-d, the reference statistics {reference[0].shape[0]}-d")
    return frechet_distance(mu, sigma, *reference)
