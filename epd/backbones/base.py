"""What every backbone offers the solvers and the stages: a denoiser with per-row σ, conditioning, decoding."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .. import schedules

# The continuous grids every σ-space backbone runs on: each takes the backbone's σ range.
SIGMA_GRIDS = ("polynomial", "logsnr", "time_uniform")


@dataclass(frozen=True)
class NoOptions:
    """A backbone without options."""


class Backbone:
    """A model behind the denoiser protocol ``D(x, sigma[B], cond) -> x0`` (see :class:`epd.solvers.Denoiser`).

    Subclasses set ``name``, ``Options`` (the dataclass of their constructor's options, what the config's
    ``backbone.options`` and the CLI flags are checked against), ``gpu`` (whether the pipeline asks the cluster for a
    GPU), ``schedules`` (the grids they run on, see :meth:`grid_args`), ``shape`` (C, H, W of the state), their σ
    range ``sigma_min``/``sigma_max`` and ``guidance``, and implement ``__call__``, ``encode`` (labels or prompts →
    cond) and ``to_pixels`` (states → pixels in [0, 1], what metrics and rewards read); ``decode`` derives uint8
    images from it.
    """

    name: str = ""
    Options: type = NoOptions
    gpu: bool = False
    schedules: tuple[str, ...] = SIGMA_GRIDS
    shape: tuple[int, ...] = ()
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    guidance: float = 1.0
    data: "DataPoints | None" = None   # embedded backbones: the data points they model (what the benchmark needs)
    # grid points of the converged reference (`epd sample --solver reference`), which states its own error against
    # twice as many: a network smooth in σ converges with fewer than a mixture, whose posterior sharpens as σ → 0
    reference_steps: int = 128

    @classmethod
    def check_schedule(cls, schedule: str) -> None:
        """Refuse a grid this backbone cannot run on, naming both (the config check calls this before any job)."""
        if schedule not in schedules.SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; expected one of {sorted(schedules.SCHEDULES)}")
        if schedule not in cls.schedules:
            raise ValueError(f"schedule {schedule!r} does not fit backbone {cls.name!r}: its grids are "
                             f"{', '.join(cls.schedules)}")

    def grid_args(self, schedule: str) -> dict[str, Any]:
        """What a grid of ``schedule`` takes from this backbone: its σ range, and the schedule's own arguments (e.g.
        SD3's flow-match shift). ``schedules.get_sigmas(schedule, n, rho=…, **backbone.grid_args(schedule))``."""
        self.check_schedule(schedule)
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "schedule_args": self.schedule_args(schedule)}

    def schedule_args(self, schedule: str) -> dict[str, Any]:
        """The arguments a named schedule takes from this backbone besides the σ range (none by default)."""
        return {}

    def sigmas(self, schedule: str, num_steps: int, rho: float = 7.0) -> torch.Tensor:
        """A grid of ``num_steps`` points of ``schedule`` on this backbone."""
        args = self.grid_args(schedule)
        return schedules.get_sigmas(schedule, num_steps, args["sigma_min"], args["sigma_max"], rho,
                                    **args["schedule_args"])

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


class DataPoints:
    """The data an embedded backbone models: centred points [M, D] (float64) with labels [M], each the centre of an
    isotropic Gaussian of variance ``var`` (``gmm-digits``: its components; ``unet-digits``: its training digits,
    var 0). The benchmark measures samples against them: the nearest point, and the exact moments of the data.
    """

    def __init__(self, points: torch.Tensor, labels: torch.Tensor, var: float = 0.0):
        self.points = points.reshape(points.shape[0], -1).double()
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.var = float(var)
        self._cache: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.points)

    def in_dtype(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Points and their half squared norms in ``dtype`` (cached: the conversion is per call otherwise)."""
        if dtype not in self._cache:
            pts = self.points.to(dtype)
            self._cache[dtype] = (pts, 0.5 * (pts**2).sum(1))
        return self._cache[dtype]

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the point nearest to each row of x: argmax of x·μ_i − |μ_i|²/2 (|x|² is common to all i)."""
        flat = x.reshape(x.shape[0], -1)
        flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
        pts, half_sq = self.in_dtype(flat.dtype)
        return torch.addmm(-half_sq, flat, pts.T).argmax(1)

    def weights(self, labels: torch.Tensor | None = None) -> np.ndarray:
        """Each point's probability under samples requested with ``labels`` (a label picks uniformly among its
        points, −1 among all); None: uniform over all points."""
        m = len(self)
        if labels is None:
            return np.full(m, 1.0 / m)
        labels = torch.as_tensor(labels, dtype=torch.long)
        w = torch.zeros(m, dtype=torch.float64)
        for c, count in zip(*torch.unique(labels, return_counts=True)):
            mask = torch.ones(m, dtype=torch.bool) if c < 0 else self.labels == c
            if not bool(mask.any()):
                raise ValueError(f"no data point has label {int(c)}")
            w += mask.double() * (float(count) / len(labels) / float(mask.sum()))
        return w.numpy()

    def stats(self, labels: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact mean and covariance of the modelled data (points with weights, plus var·I), float64."""
        pts = self.points.numpy()
        w = self.weights(labels)
        cov = np.cov(pts, rowvar=False, aweights=w, bias=True) + self.var * np.eye(pts.shape[1])
        return w @ pts, cov
