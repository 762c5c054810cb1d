"""How a solver spends an NFE budget: grid length, a trailing σ = 0 or not, AFS or not.

One rule per solver family, so that ``epd sample --nfe`` and the benchmark compare solvers at equal cost:

- one call per step (euler, dpmpp_2m, dpmpp_3m, unipc, ipndm): NFE + 1 points ending at σ_min;
- EPD and DPM-Solver-2 (two calls per step, the second one inside the step): AFS for odd NFE, grid ending at
  σ_min, as in the EPD and AMED papers;
- Heun: EDM's recipe, the grid ends in 0 and the step into it is Euler (the trapezoid is undefined at σ = 0);
  AFS for even NFE.

The reference solver is not budgeted: ``configure("reference", steps=...)`` (see :mod:`epd.solvers.reference`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import schedules
from .table import SolverTable


@dataclass(frozen=True)
class Plan:
    num_steps: int       # grid points before any trailing 0
    ends_at_zero: bool
    afs: bool


def plan_for_nfe(solver: str, nfe: int) -> Plan:
    """The grid that makes ``solver`` cost exactly ``nfe`` sequential denoiser calls."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    if solver in ("epd", "epd_plugin", "dpm2"):
        if nfe < 2:
            raise ValueError(f"{solver} needs nfe >= 2 (one step with AFS costs 1 + 1 calls)")
        afs = nfe % 2 == 1
        return Plan(num_steps=(nfe + int(afs)) // 2 + 1, ends_at_zero=False, afs=afs)
    if solver == "heun":
        afs = nfe % 2 == 0
        if nfe + int(afs) < 3:
            raise ValueError("heun needs nfe >= 3")
        return Plan(num_steps=(nfe + 1 + int(afs)) // 2, ends_at_zero=True, afs=afs)
    if solver in ("euler", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm"):
        return Plan(num_steps=nfe + 1, ends_at_zero=False, afs=False)
    raise ValueError(f"unknown solver {solver!r}")


def grid_for(plan: Plan, schedule: str, sigma_min: float, sigma_max: float, rho: float = 7.0,
             **schedule_args) -> torch.Tensor:
    sigmas = schedules.get_sigmas(schedule, plan.num_steps, sigma_min, sigma_max, rho, **schedule_args)
    return schedules.append_zero(sigmas) if plan.ends_at_zero else sigmas


@dataclass(frozen=True)
class Configured:
    """A solver bound to its grid (and table, for EPD): call it as ``run(denoiser, x, cond)``."""

    name: str
    sigmas: torch.Tensor
    afs: bool
    table: SolverTable | None = None

    @property
    def nfe(self) -> int:
        from . import nfe as count

        base = "epd" if self.table is not None else self.name
        ends_at_zero = bool(self.sigmas[-1] == 0)
        return count(base, len(self.sigmas), ends_at_zero=ends_at_zero, afs=self.afs)

    def __call__(self, denoiser, x: torch.Tensor, cond=None, callback=None) -> torch.Tensor:
        from . import BASELINES, sample_epd, sample_reference

        if self.table is not None:
            return sample_epd(denoiser, x, self.sigmas, self.table, cond=cond, callback=callback)
        fn = sample_reference if self.name == "reference" else BASELINES[self.name]
        return fn(denoiser, x, self.sigmas, cond=cond, callback=callback, afs=self.afs)


def configure(solver: str, nfe: int | None = None, *, schedule: str | None = None, sigma_min: float = 0.002,
              sigma_max: float = 80.0, rho: float = 7.0, table: SolverTable | None = None,
              num_points: int = 2, schedule_args: dict | None = None, steps: int | None = None,
              **table_meta) -> Configured:
    """Bind a solver to a grid. ``solver`` is a baseline name, ``"epd"``, ``"epd_plugin"`` or ``"reference"``.

    ``schedule`` defaults to ``"polynomial"``. EPD takes ``table`` (its metadata fixes grid and NFE) or, without
    one, a hand-set table of ``num_points`` built for ``nfe`` on the given schedule. The reference
    (:mod:`epd.solvers.reference`) is set by ``steps``, its grid points uniform in log σ (default: per backbone,
    from ``backbone=`` among ``table_meta``), not by an NFE.
    """
    from .table import handset_table

    if solver == "reference":
        return _configure_reference(nfe, schedule, table, steps, sigma_min, sigma_max, table_meta.get("backbone"))
    if steps is not None:
        raise ValueError(f"steps= sets the reference solver's grid; {solver} is set by nfe")
    schedule = schedule or "polynomial"
    schedule_args = schedule_args or {}
    if solver in ("epd", "epd_plugin"):
        if table is None:
            if nfe is None:
                raise ValueError("EPD needs a table or an nfe for a hand-set table")
            plan = plan_for_nfe(solver, nfe)
            table = handset_table(plan.num_steps, num_points, plugin=solver == "epd_plugin", afs=plan.afs,
                                  schedule=schedule, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                                  schedule_args=schedule_args, **table_meta)
        elif nfe is not None and nfe != table.meta.nfe:
            raise ValueError(f"the table is for nfe={table.meta.nfe}, asked for nfe={nfe}")
        return Configured(solver, table.meta.sigmas(), table.meta.afs, table)
    if nfe is None:
        raise ValueError(f"{solver} needs an nfe")
    plan = plan_for_nfe(solver, nfe)
    sigmas = grid_for(plan, schedule, sigma_min, sigma_max, rho, **schedule_args)
    return Configured(solver, sigmas, plan.afs)


def _configure_reference(nfe, schedule, table, steps, sigma_min, sigma_max, backbone) -> Configured:
    from .reference import reference_grid, reference_steps

    if nfe is not None:
        raise ValueError(f"the reference solver is set by steps (grid points), not nfe (got nfe={nfe}); its default "
                         f"for {backbone or 'this backbone'} is {reference_steps(backbone)} steps")
    if schedule not in (None, "logsnr"):
        raise ValueError(f"the reference solver's grid is uniform in log σ, not schedule {schedule!r}")
    if table is not None:
        raise ValueError("the reference solver takes no table")
    steps = reference_steps(backbone) if steps is None else steps
    return Configured("reference", reference_grid(steps, sigma_min, sigma_max), afs=False)
