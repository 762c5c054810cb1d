"""What every backbone offers the solvers and the stages: a denoiser with per-row σ, conditioning, decoding."""
from __future__ import annotations

from typing import Any, Sequence

import torch


class Backbone:
    """A model behind the denoiser protocol ``D(x, sigma[B], cond) -> x0`` (see :class:`epd.solvers.Denoiser`).

    Subclasses set ``name``, ``shape`` (C, H, W of the state), the default ``sigma_min``/``sigma_max`` of their
    grids and ``guidance``, and implement ``__call__``, ``encode`` (labels or prompts → cond) and ``to_pixels``
    (states → pixels in [0, 1], what metrics and rewards read); ``decode`` derives uint8 images from it.
    """

    name: str = ""
    shape: tuple[int, ...] = ()
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    guidance: float = 1.0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, labels: Sequence[int] | None = None, prompts: Sequence[str] | None = None) -> Any:
        raise NotImplementedError

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Samples → float pixels [B, C, H, W] in [0, 1] (data mean added back, clipped)."""
        raise NotImplementedError

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples → uint8 images, [B, H, W] for one channel, else [B, C, H, W]."""
        img = (self.to_pixels(x) * 255).round().to(torch.uint8)
        return img.squeeze(1) if img.shape[1] == 1 else img

    def noise(self, seeds: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Start states x_0 = σ_max · ε, one generator per seed, so a sample depends on its seed alone."""
        eps = [torch.randn(self.shape, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
               for s in seeds]
        return (torch.stack(eps) * self.sigma_max).to(dtype)


class CallCounter:
    """Wraps a denoiser and records each call's row count (sequential NFE = number of calls)."""

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.rows: list[int] = []

    def __call__(self, x, sigma, cond=None):
        self.rows.append(x.shape[0])
        return self.denoiser(x, sigma, cond)

    @property
    def calls(self) -> int:
        return len(self.rows)
