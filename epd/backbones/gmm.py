"""``gmm-digits``: the exact denoiser of a Gaussian mixture on scikit-learn's 1797 handwritten digits.

The data distribution is p(y) = Σ_i π_i N(y; μ_i, s² I), one component per digit image μ_i (pixels in [−1, 1],
centred by the mean image so that AFS's zero-mean assumption holds), π uniform over the digits of the requested
label (or over all of them). For x = y + σ·ε the posterior mean is closed-form:

    w_i(x, σ) ∝ π_i · exp(−|x − μ_i|² / (2(s² + σ²)))
    D(x, σ)  = (σ² · Σ_i w_i μ_i + s² · x) / (s² + σ²)

so every solver can be measured against the exact ODE without training anything. Logits are computed in x's own
precision (at least float32) without forming |x|², which cancels in the softmax.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch

from ..data import labels_from_prompts, load_digit_images
from ..options import Field
from .base import Backbone, DataPoints


@dataclass(frozen=True)
class GMMOptions:
    """Options of gmm-digits."""

    component_std: Annotated[float, Field(gt=0, description="isotropic std of each mixture component, in [-1, 1] "
                                                            "pixel units")] = 0.1
    resolution: Annotated[int, Field(ge=8, multiple_of=8, description="image side (the digits are 8x8; larger "
                                                                      "sides interpolate them)")] = 8
    guidance: Annotated[float, Field(ge=0, description="classifier-free guidance scale (1 = none)")] = 1.0


class GMMDigits(Backbone):
    """Exact posterior-mean denoiser of the digit mixture; class-conditional with classifier-free guidance.

    ``cond`` is a [B] long tensor of labels 0–9, −1 meaning unconditional (the null label). With ``guidance`` w,
    D = D_uncond + w · (D_cond − D_uncond); w = 1 is plain conditional sampling.
    """

    name = "gmm-digits"
    reference_steps = 512
    Options = GMMOptions
    sigma_min = 0.002
    sigma_max = 80.0

    def __init__(self, component_std: float = 0.1, resolution: int = 8, guidance: float = 1.0,
                 chunk_rows: int = 4096):
        if component_std <= 0:
            raise ValueError(f"component_std must be > 0, got {component_std}")
        images, labels = load_digit_images(resolution)
        self.data_mean = images.mean(0)                       # [1, R, R], added back by to_pixels()
        self.components = (images - self.data_mean).flatten(1)  # μ_i, centred, [M, D]
        self.component_labels = labels
        self.component_var = float(component_std) ** 2
        self.shape = (1, resolution, resolution)
        self.guidance = float(guidance)
        self.chunk_rows = chunk_rows
        self.data = DataPoints(self.components, labels, self.component_var)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is None or self.guidance == 1.0:
            return self.posterior_mean(x, sigma, cond)
        uncond = torch.full_like(cond, -1)
        d_u = self.posterior_mean(x, sigma, uncond)
        d_c = self.posterior_mean(x, sigma, cond)
        # Rows without a label stay unconditional whatever the guidance.
        w = torch.where(cond >= 0, self.guidance, 1.0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return d_u + w * (d_c - d_u)

    def responsibilities(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None):
        """Posterior component weights w_i(x, σ), [B, M], in x's precision (at least float32).

        |x − μ_i|² = |x|² − 2 x·μ_i + |μ_i|²; the |x|² term is the same for every component and cancels in the
        softmax, so the logits are (x·μ_i − |μ_i|²/2) / (s² + σ²): one matrix product, no cancellation of |x|².
        """
        flat = x.reshape(x.shape[0], -1)
        flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
        comps, half_sq = self.data.in_dtype(flat.dtype)
        var = self.component_var + sigma.to(flat.dtype).reshape(-1, 1) ** 2
        logits = torch.addmm(-half_sq, flat, comps.T) / var
        if labels is not None:
            mask = (labels.reshape(-1, 1) >= 0) & (labels.reshape(-1, 1) != self.component_labels)
            logits = logits.masked_fill(mask, float("-inf"))
        return torch.softmax(logits, dim=1)

    def nearest_component(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the component (data point) nearest to each row: argmax of the σ → 0 logits."""
        return self.data.nearest(x)

    def posterior_mean(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must have one value per row, shape ({x.shape[0]},), got {tuple(sigma.shape)}")
        if labels is not None and bool((labels > 9).any() | (labels < -1).any()):
            raise ValueError("labels must be digits 0-9, or -1 for unconditional")
        out = []
        for s in range(0, x.shape[0], self.chunk_rows):
            sl = slice(s, s + self.chunk_rows)
            xs, sig = x[sl], sigma[sl]
            w = self.responsibilities(xs, sig, None if labels is None else labels[sl])
            flat = xs.reshape(xs.shape[0], -1).to(w.dtype)
            s2, v = self.component_var, sig.to(w.dtype).reshape(-1, 1) ** 2
            mean = (v * (w @ self.data.in_dtype(w.dtype)[0]) + s2 * flat) / (s2 + v)
            out.append(mean.to(x.dtype).reshape(xs.shape))
        return torch.cat(out)

    def data_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Exact mean and covariance of the modelled distribution (the mixture, not just its centres), float64.

        This is what an exact sampler reproduces, so a Fréchet distance against it has a floor of sampling noise
        only; against the bare digits a sampler that lands nearer the centres than the mixture would score better
        than the exact ODE.
        """
        return self.data.stats()

    def encode(self, labels: list[int] | None = None, prompts: list[str] | None = None) -> torch.Tensor | None:
        """Conditioning for a batch: labels as given, or parsed from prompts; None if neither (unconditional)."""
        if prompts is not None:
            return labels_from_prompts(prompts)
        if labels is not None:
            return torch.as_tensor(labels, dtype=torch.long)
        return None

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Samples → float64 pixels [B, 1, R, R] in [0, 1] (the data mean added back, [−1, 1] → [0, 1])."""
        return ((x.double().cpu() + self.data_mean).clamp(-1, 1) + 1) / 2
