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

import math
import warnings
from dataclasses import dataclass

import torch

from .. import schedules
from .grid import GridError, SolverGrid
from .reference import reference_grid, reference_steps
from .registry import SOLVERS, nfe as count_nfe, solver as lookup
from .table import EXPLICIT, SolverTable, TableError, handset_table


@dataclass(frozen=True)
class Plan:
    num_steps: int       # grid points before any trailing 0
    ends_at_zero: bool
    afs: bool


def plan_for_nfe(solver: str, nfe: int) -> Plan:
    """The grid that makes ``solver`` cost exactly ``nfe`` sequential denoiser calls."""
    budget = lookup(solver).budget
    if budget == "steps":
        raise ValueError(f"{solver} is set by its number of steps, not by an NFE budget")
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    if budget == "two_call":
        if nfe < 2:
            raise ValueError(f"{solver} needs nfe >= 2 (one step with AFS costs 1 + 1 calls)")
        afs = nfe % 2 == 1
        return Plan(num_steps=(nfe + int(afs)) // 2 + 1, ends_at_zero=False, afs=afs)
    if budget == "heun":
        afs = nfe % 2 == 0
        if nfe + int(afs) < 3:
            raise ValueError(f"{solver} needs nfe >= 3")
        return Plan(num_steps=(nfe + 1 + int(afs)) // 2, ends_at_zero=True, afs=afs)
    return Plan(num_steps=nfe + 1, ends_at_zero=False, afs=False)


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
        return count_nfe(self.name, len(self.sigmas), ends_at_zero=bool(self.sigmas[-1] == 0), afs=self.afs)

    def __call__(self, denoiser, x: torch.Tensor, cond=None, callback=None) -> torch.Tensor:
        fn = SOLVERS[self.name].fn
        if self.table is not None:
            return fn(denoiser, x, self.sigmas, self.table, cond=cond, callback=callback)
        return fn(denoiser, x, self.sigmas, cond=cond, callback=callback, afs=self.afs)


def check_table_use(table: SolverTable, *, backbone: str | None = None, sigma_max: float | None = None,
                    schedule: str | None = None, source: str = "the table") -> None:
    """Refuse a table where it does not fit, with a :class:`TableError` that names the mismatch.

    ``backbone``: the table's backbone must be this one, or empty (a table made for no particular backbone, e.g.
    imported from the EPD authors' pixel-space tables, fits any backbone of its σ range). ``sigma_max``: the
    backbone's σ_max, where samples start (σ_max·ε); the table's grid must start there too. ``schedule``: a schedule
    the user asked for explicitly (None: not asked). A table fixes its grid, so the request must name the table's
    own schedule; a table with its own grid (schedule "explicit") refuses any named schedule.
    """
    m = table.meta
    _check_fit(TableError, source, m.backbone, float(m.sigmas()[0]), m.schedule, m.grid is not None, backbone,
               sigma_max, schedule)


def check_grid_use(grid: SolverGrid, *, backbone: str | None = None, sigma_max: float | None = None,
                   schedule: str | None = None, source: str = "the grid") -> None:
    """:func:`check_table_use` for a learned grid (:class:`SolverGrid`): it carries its own grid, learned against a
    teacher on ``grid.schedule``; a request for another schedule is refused with a :class:`GridError`."""
    _check_fit(GridError, source, grid.backbone, grid.grid[0], grid.schedule, True, backbone, sigma_max, schedule)


def _check_fit(error: type[Exception], source: str, have_backbone: str, start: float, have_schedule: str,
               own_grid: bool, backbone: str | None, sigma_max: float | None, schedule: str | None) -> None:
    if backbone is not None and have_backbone not in ("", backbone):
        raise error(f"{source} was made for backbone {have_backbone!r}, not {backbone!r}")
    if sigma_max is not None and not math.isclose(start, sigma_max, rel_tol=1e-6):
        raise error(f"{source}'s grid starts at sigma={start:g}, but the backbone's samples start at "
                    f"sigma_max={sigma_max:g}: it is for another noise range")
    if schedule is None or schedule == have_schedule:
        return
    if have_schedule == EXPLICIT:
        raise error(f"{source} carries its own grid (schedule {EXPLICIT!r}) and ignores the schedule options; "
                    f"asked for schedule {schedule!r}: leave the schedule unset")
    if own_grid:
        raise error(f"{source} carries its own grid, learned on schedule {have_schedule!r}; asked for schedule "
                    f"{schedule!r}: use {have_schedule!r} or leave the schedule unset")
    raise error(f"{source} was made on schedule {have_schedule!r}, which fixes its grid; asked for schedule "
                f"{schedule!r}")


def configure(solver: str, nfe: int | None = None, *, schedule: str | None = None, sigma_min: float = 0.002,
              sigma_max: float = 80.0, rho: float = 7.0, table: SolverTable | None = None,
              num_points: int = 2, schedule_args: dict | None = None, steps: int | None = None,
              grid: SolverGrid | None = None, **table_meta) -> Configured:
    """Bind a solver to a grid. ``solver`` is a baseline name, ``"epd"``, ``"epd_plugin"`` or ``"reference"``.

    ``schedule`` defaults to ``"polynomial"``. EPD takes ``table`` (its metadata fixes grid and NFE, and the
    schedule options are unused: see :func:`check_table_use` to refuse a conflicting request) or, without one, a
    hand-set table of ``num_points`` built for ``nfe`` on the given schedule. The reference
    (:mod:`epd.solvers.reference`) is set by ``steps``, its grid points uniform in log σ (default: per backbone,
    from ``backbone=`` among ``table_meta``), not by an NFE. A baseline takes a learned ``grid`` (a
    :class:`SolverGrid` for that solver, which fixes grid, AFS and NFE) instead of a schedule.
    """
    if solver == "reference":
        return _configure_reference(nfe, schedule, table, steps, sigma_min, sigma_max, table_meta.get("backbone"))
    if steps is not None:
        raise ValueError(f"steps= sets the reference solver's grid; {solver} is set by nfe")
    schedule = schedule or "polynomial"
    schedule_args = schedule_args or {}
    if lookup(solver).table:
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
    if grid is not None:
        if grid.solver != solver:
            raise GridError(f"the grid is for {grid.solver!r}, asked for {solver!r}")
        if nfe is not None and nfe != grid.nfe:
            raise GridError(f"the grid is for nfe={grid.nfe}, asked for nfe={nfe}")
        return Configured(solver, grid.sigmas(), grid.afs)
    if nfe is None:
        raise ValueError(f"{solver} needs an nfe")
    plan = plan_for_nfe(solver, nfe)
    sigmas = grid_for(plan, schedule, sigma_min, sigma_max, rho, **schedule_args)
    return Configured(solver, sigmas, plan.afs)


def configure_for(backbone, solver: str, nfe: int | None = None, *, table: SolverTable | None = None,
                  schedule: str = "polynomial", rho: float = 7.0, num_points: int = 2,
                  steps: int | None = None, grid: SolverGrid | None = None) -> Configured:
    """:func:`configure` on ``backbone``'s own grid: the schedule's σ range and arguments come from the backbone
    (and a schedule it cannot run on is refused); a table or learned grid must fit the backbone
    (:func:`check_table_use`, :func:`check_grid_use`); the reference runs on the backbone's σ range with ``steps``
    points (default: per backbone)."""
    if solver == "reference":
        return configure("reference", steps=steps, sigma_min=backbone.sigma_min, sigma_max=backbone.sigma_max,
                         backbone=backbone.name)
    if grid is not None:
        check_grid_use(grid, backbone=backbone.name, sigma_max=backbone.sigma_max)
        return configure(grid.solver, nfe, grid=grid)
    if table is not None:
        check_table_use(table, backbone=backbone.name, sigma_max=backbone.sigma_max)
        if not math.isclose(table.meta.guidance, backbone.guidance):
            # allowed (a table may serve another scale), but its parameters were fitted at the recorded one
            warnings.warn(f"the table was fitted at guidance {table.meta.guidance:g}; sampling at the backbone's "
                          f"guidance {backbone.guidance:g} (set the backbone option guidance to match it)", stacklevel=2)
        return configure("epd_plugin" if table.meta.plugin else "epd", nfe, table=table)
    return configure(solver, nfe, schedule=schedule, rho=rho, num_points=num_points, backbone=backbone.name,
                     **backbone.grid_args(schedule))


def _configure_reference(nfe, schedule, table, steps, sigma_min, sigma_max, backbone) -> Configured:
    if nfe is not None:
        raise ValueError(f"the reference solver is set by steps (grid points), not nfe (got nfe={nfe}); its default "
                         f"for {backbone or 'this backbone'} is {reference_steps(backbone)} steps")
    if schedule not in (None, "logsnr"):
        raise ValueError(f"the reference solver's grid is uniform in log σ, not schedule {schedule!r}")
    if table is not None:
        raise ValueError("the reference solver takes no table")
    steps = reference_steps(backbone) if steps is None else steps
    return Configured("reference", reference_grid(steps, sigma_min, sigma_max), afs=False)
