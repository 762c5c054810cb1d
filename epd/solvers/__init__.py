"""Diffusion ODE solvers over a denoiser ``D(x, sigma[B], cond) -> x0``: baselines, EPD, EPD-Plugin, tables, and
the registry that names them (``SOLVERS``)."""
from __future__ import annotations

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
from .grid import GridError, SolverGrid, load_grid, save_grid
from .reference import reference_error, sample_reference, solve_reference
from .registry import BASELINES, SOLVERS, TEACHERS, Solver, nfe, solver
from .table import SolverTable, TableError, TableMeta, handset_table, load_table, save_table

__all__ = [
    "BASELINES", "Denoiser", "GridError", "SOLVERS", "Solver", "SolverGrid", "SolverTable", "TEACHERS", "TableError",
    "TableMeta", "handset_table", "load_grid", "load_table", "nfe", "reference_error", "sample_dpm2", "sample_dpmpp_2m",
    "sample_dpmpp_3m", "sample_epd", "sample_euler", "sample_heun", "sample_ipndm", "sample_reference", "sample_unipc",
    "save_grid", "save_table", "solve_reference", "solver", "to_d",
]
