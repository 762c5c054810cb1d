"""Every solver by name: its function and how it spends an NFE budget. Adding a solver is its function in its own
module plus one line in :data:`SOLVERS`; the CLI's choices, the config schema, NFE counting and grid planning all
read this table."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .baselines import (sample_dpm2, sample_dpmpp_2m, sample_dpmpp_3m, sample_euler, sample_heun, sample_ipndm,
                        sample_unipc)
from .epd import sample_epd
from .reference import sample_reference

# How a solver lays out the grid for an NFE budget (epd.solvers.plan):
#   "one_call"  one denoiser call per step: NFE + 1 points ending at σ_min;
#   "two_call"  a second call inside each step (DPM-Solver-2, EPD): AFS for odd NFE, ending at σ_min;
#   "heun"      EDM's recipe: the grid ends in 0 and the step into it is Euler; AFS for even NFE;
#   "steps"     not spent by NFE: the reference's grid is a number of steps (epd.solvers.reference).
BUDGETS = ("one_call", "two_call", "heun", "steps")


@dataclass(frozen=True)
class Solver:
    fn: Callable
    budget: str                  # one of BUDGETS
    title: str                   # how reports name it
    teacher: bool = False        # accurate enough (with inserted steps) to make teacher trajectories
    table: bool = False          # takes a solver table (EPD, EPD-Plugin)

    @property
    def calls_per_step(self) -> int:
        return 2 if self.budget in ("two_call", "heun") else 1


SOLVERS: dict[str, Solver] = {
    "euler": Solver(sample_euler, "one_call", "Euler"),
    "heun": Solver(sample_heun, "heun", "Heun", teacher=True),
    "dpm2": Solver(sample_dpm2, "two_call", "DPM-Solver-2", teacher=True),
    "dpmpp_2m": Solver(sample_dpmpp_2m, "one_call", "DPM-Solver++(2M)"),
    "dpmpp_3m": Solver(sample_dpmpp_3m, "one_call", "DPM-Solver++(3M)"),
    "unipc": Solver(sample_unipc, "one_call", "UniPC"),
    "ipndm": Solver(sample_ipndm, "one_call", "iPNDM"),
    "epd": Solver(sample_epd, "two_call", "EPD", table=True),
    "epd_plugin": Solver(sample_epd, "two_call", "EPD-Plugin", table=True),
    # the converged solution, what accuracy is measured against
    "reference": Solver(sample_reference, "steps", "reference (DPM-Solver++(3M), converged)"),
}

# Hand-designed solvers, each f(denoiser, x, sigmas, *, cond=None, callback=None, afs=False).
BASELINES: dict[str, Callable] = {name: s.fn for name, s in SOLVERS.items() if not s.table and s.budget != "steps"}
TEACHERS: dict[str, Callable] = {name: s.fn for name, s in SOLVERS.items() if s.teacher}


def solver(name: str) -> Solver:
    """The registry entry of ``name``, or an error listing the known solvers."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; expected one of {sorted(SOLVERS)}")
    return SOLVERS[name]


def nfe(name: str, num_points: int, *, ends_at_zero: bool = False, afs: bool = False) -> int:
    """Sequential denoiser calls for a grid of ``num_points`` (counting a trailing 0 if ``ends_at_zero``).

    Heun and DPM-Solver-2 take a first-order step into σ = 0 (one call); EPD's K parallel calls count once.
    """
    steps = num_points - 1
    if solver(name).calls_per_step == 2:
        return 2 * steps - int(ends_at_zero) - int(afs)
    return steps - int(afs)
