"""The reference solver: the converged solution of the diffusion ODE for given noise and conditions.

DPM-Solver++(3M) on a fine grid uniform in log σ, in float64. A fast solver's accuracy is its distance to this
solution from the same noise and conditions (the benchmark, :mod:`epd.metrics.reference`). On ``gmm-digits`` the
denoiser is exact, so the reference is the exact ODE's solution up to its own error; on a learned backbone it is
the solution of the network's ODE (what a solver can at best reproduce), not the data.

The error is estimated, not assumed: :func:`reference_error` re-solves a subset with twice the steps. The grid ends
at σ_min, as the grids of the fast solvers do; a solver whose grid ends in 0 (Heun) is compared with one more
denoiser call, ``D(x, σ_min)`` (:func:`solve_reference` with ``at_zero``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .. import schedules
from .baselines import sample_dpmpp_3m
from .common import Callback, Cond, Denoiser, denoise, select_rows

if TYPE_CHECKING:
    from ..backbones.base import DataPoints


def reference_steps(backbone: str | None = None) -> int:
    """The reference's grid points for a backbone name (its ``reference_steps``; the most of any for none)."""
    from ..backbones import BACKBONES, backbone_class

    return backbone_class(backbone).reference_steps if backbone else max(c.reference_steps for c in BACKBONES.values())


def reference_grid(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """``steps`` points uniform in log σ from σ_max to σ_min (float64, no trailing 0)."""
    if steps < 16:   # on shorter grids DPM-Solver++ lowers its order over the last steps (lower_order_final)
        raise ValueError(f"a reference needs a fine grid, got steps={steps} (at least 16)")
    return schedules.logsnr(steps, sigma_min, sigma_max)


def sample_reference(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: Cond = None,
    callback: Callback | None = None, afs: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(3M) in float64 on ``sigmas`` (a :func:`reference_grid`); the result in x's dtype.

    Float64 because over hundreds of steps float32 round-off would be of the order of the error being measured
    (a float32 denoiser, e.g. the digit UNet, still computes in float32 inside).
    """
    if afs:
        raise ValueError("the reference solver takes no analytic first step (afs): it estimates nothing")
    return sample_dpmpp_3m(denoiser, x.double(), sigmas, cond=cond, callback=callback).to(x.dtype)


def solve_reference(
    denoiser: Denoiser, x: torch.Tensor, steps: int, *, sigma_min: float, sigma_max: float, cond: Cond = None,
    batch_size: int | None = None, at_zero: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The reference solution (float64) of start states ``x`` (at σ_max), in batches of ``batch_size`` rows.

    With ``at_zero`` also the state at σ = 0, ``D(x, σ_min)`` (the first-order step into 0 that grids ending in 0
    take): returns ``(at_sigma_min, at_zero)``.
    """
    sigmas = reference_grid(steps, sigma_min, sigma_max)
    batch_size = batch_size or len(x)
    at_min, at_0 = [], []
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            rows = torch.arange(s, min(s + batch_size, len(x)))
            c = select_rows(cond, rows)
            out = sample_reference(denoiser, x[rows].double(), sigmas, cond=c)
            at_min.append(out)
            if at_zero:
                at_0.append(denoise(denoiser, out, out.new_tensor(sigma_min), c))
    return (torch.cat(at_min), torch.cat(at_0)) if at_zero else torch.cat(at_min)


@dataclass(frozen=True)
class ReferenceError:
    """The reference's own error, estimated against a run with twice the steps on ``samples`` start states."""

    steps: int
    samples: int
    rms: float                 # RMS over all elements of (reference − finer reference), in the state's units
    same_mode: float | None    # fraction ending nearest the same data point (None: no data points given)
    finer: torch.Tensor = field(repr=False)   # the finer run's solution, for further comparisons


def reference_error(
    denoiser: Denoiser, x: torch.Tensor, steps: int, *, sigma_min: float, sigma_max: float, cond: Cond = None,
    data: DataPoints | None = None, batch_size: int | None = None, solved: torch.Tensor | None = None,
) -> ReferenceError:
    """Estimate the error of the ``steps``-point reference on start states ``x`` from a ``2·steps`` run.

    ``solved``: the reference solution of ``x`` if the caller already has it (saves one solve). ``data``: the
    backbone's data points, to count the samples whose nearest point changes (on a mixture, the mode they end in).
    The finer run's own error is of higher order, so the difference estimates the coarser run's error.
    """
    grid = {"sigma_min": sigma_min, "sigma_max": sigma_max, "cond": cond, "batch_size": batch_size}
    coarse = solve_reference(denoiser, x, steps, **grid) if solved is None else solved.double()
    if coarse.shape != x.shape:
        raise ValueError(f"solved has shape {tuple(coarse.shape)}, the start states {tuple(x.shape)}")
    fine = solve_reference(denoiser, x, 2 * steps, **grid)
    rms = float(((coarse - fine) ** 2).mean().sqrt())
    same = None if data is None else float((data.nearest(coarse) == data.nearest(fine)).double().mean())
    return ReferenceError(steps=steps, samples=len(x), rms=rms, same_mode=same, finer=fine)
