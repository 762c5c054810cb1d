"""Diffusion ODE solvers over a denoiser ``D(x, sigma[B], cond) -> x0``: baselines, EPD, EPD-Plugin, tables."""
from __future__ import annotations

from typing import Callable

import torch

from .baselines import (
    sample_dpm2,
    sample_dpmpp_2m,
    sample_dpmpp_3m,
    sample_euler,
    sample_heun,
    sample_ipndm,
    sample_unipc,
)
from .common import Denoiser, to_d
from .epd import sample_epd
from .reference import reference_error, sample_reference, solve_reference
from .table import SolverTable, TableError, TableMeta, handset_table, load_table, save_table

# Baselines by name. Each is f(denoiser, x, sigmas, *, cond=None, callback=None, afs=False).
BASELINES: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "dpm2": sample_dpm2,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "unipc": sample_unipc,
    "ipndm": sample_ipndm,
}
# Solvers that evaluate the denoiser twice per step (the second time inside the step).
TWO_CALLS_PER_STEP = {"heun", "dpm2", "epd"}


def nfe(solver: str, num_points: int, *, ends_at_zero: bool = False, afs: bool = False) -> int:
    """Sequential denoiser calls for a grid of ``num_points`` (counting a trailing 0 if ``ends_at_zero``).

    Heun and DPM-Solver-2 take a first-order step into σ = 0 (one call); EPD's K parallel calls count once; the
    reference is DPM-Solver++(3M), one call per step.
    """
    steps = num_points - 1
    if solver in TWO_CALLS_PER_STEP:
        return 2 * steps - int(ends_at_zero) - int(afs)
    if solver in BASELINES or solver == "reference":
        return steps - int(afs)
    raise ValueError(f"unknown solver {solver!r}; expected one of {sorted(BASELINES) + ['epd', 'reference']}")


__all__ = [
    "BASELINES", "Denoiser", "SolverTable", "TableError", "TableMeta", "handset_table", "load_table", "nfe",
    "reference_error", "sample_dpm2", "sample_dpmpp_2m", "sample_dpmpp_3m", "sample_epd", "sample_euler",
    "sample_heun", "sample_ipndm", "sample_reference", "sample_unipc", "save_table", "solve_reference", "to_d",
]
