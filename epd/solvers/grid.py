"""A learned grid for a hand-designed solver (e.g. by :mod:`epd.ld3`): the σ points and what they were made for.

On disk a grid is one small JSON file, ``NAME.json``: ``format`` ("epd-solver-grid"), ``format_version``, ``solver``
(a baseline name), ``grid`` (σ_0 > … > σ_{N−1} > 0, or a trailing 0 for solvers that step into it), ``afs``,
``nfe`` (derived from the rest and checked), ``backbone``, ``schedule`` (the schedule of the teacher it was fitted
to: the grid belongs to configs of that schedule and overrides its points), ``conditions`` (the labels or prompts
it was fitted on, null if unconditional) and free-form ``provenance``. Nothing here unpickles.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write, looks_like_pickle, read_json_header
from ..schedules import SCHEDULES
from .registry import BASELINES, nfe

FORMAT = "epd-solver-grid"
FORMAT_VERSION = 1
_KEYS = {"format", "format_version", "solver", "grid", "afs", "nfe", "backbone", "schedule", "conditions",
         "provenance"}


class GridError(ValueError):
    """A solver grid (or its file) is malformed or does not fit what it is used with."""


@dataclass(frozen=True)
class SolverGrid:
    """A baseline solver bound to an explicit grid; ``nfe`` is derived, never free."""

    solver: str                     # a name in epd.solvers.BASELINES
    grid: tuple[float, ...]         # σ_0 > … > σ_{N−1}; only the last may be 0
    afs: bool = False
    backbone: str = ""
    schedule: str = "polynomial"    # the teacher's schedule: the configs the grid belongs to
    conditions: tuple[int | str, ...] | None = None   # labels or prompts it was fitted on; None: unconditional

    @property
    def nfe(self) -> int:
        return nfe(self.solver, len(self.grid), ends_at_zero=self.grid[-1] == 0, afs=self.afs)

    def sigmas(self) -> torch.Tensor:
        return torch.tensor(self.grid, dtype=torch.float64)

    def validate(self) -> "SolverGrid":
        """Check the solver name, the grid and the field types; raise :class:`GridError` naming the first problem."""
        if self.solver not in BASELINES:
            raise GridError(f"unknown solver {self.solver!r}; a grid is for one of {sorted(BASELINES)}")
        g = self.grid
        if not isinstance(g, (list, tuple)) or len(g) < 2 or not all(_is_number(v) for v in g):
            raise GridError(f"grid must list at least 2 numbers, got {g!r}")
        if not all(math.isfinite(v) for v in g):
            raise GridError(f"grid must be finite, got {list(g)!r}")
        if any(v <= 0 for v in g[:-1]) or g[-1] < 0:
            raise GridError(f"grid must be positive (only its last point may be 0), got {list(g)!r}")
        if any(a <= b for a, b in zip(g, g[1:])):
            raise GridError(f"grid must be strictly decreasing, got {list(g)!r}")
        if not isinstance(self.afs, bool):
            raise GridError(f"afs must be true or false, got {self.afs!r}")
        if not isinstance(self.backbone, str):
            raise GridError(f"backbone must be a string, got {self.backbone!r}")
        if self.schedule not in SCHEDULES:
            raise GridError(f"schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}")
        c = self.conditions
        if c is not None and not (isinstance(c, (list, tuple)) and c and all(
                isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)) for v in c)):
            raise GridError(f"conditions must be null or a non-empty list of labels or prompts, got {c!r}")
        if self.nfe < 1:
            raise GridError(f"a {self.solver} grid of {len(g)} points (afs={self.afs}) makes no denoiser call")
        return self

    def to_json(self) -> dict[str, Any]:
        return {"solver": self.solver, "grid": list(self.grid), "afs": self.afs, "nfe": self.nfe,
                "backbone": self.backbone, "schedule": self.schedule,
                "conditions": None if self.conditions is None else list(self.conditions)}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def grid_path(path: str | os.PathLike) -> Path:
    """``X`` or ``X.json`` → ``X.json``."""
    p = Path(path)
    return p if p.suffix == ".json" else p.with_name(p.name + ".json")


def is_grid_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a solver-grid JSON file (rather than, e.g., a table's): its ``format`` says so."""
    p = grid_path(path)
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == FORMAT
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False


def save_grid(grid: SolverGrid, path: str | os.PathLike, provenance: dict[str, Any] | None = None) -> Path:
    """Validate and write ``PATH.json`` atomically; returns its path. ``provenance`` is stored, loading ignores it."""
    grid.validate()
    out = grid_path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, **grid.to_json()}
    if provenance is not None:
        header["provenance"] = provenance
    atomic_write(out, (json.dumps(header, indent=2) + "\n").encode())
    return out


def load_grid(path: str | os.PathLike, expect: dict[str, Any] | None = None) -> SolverGrid:
    """Load and validate a grid; ``expect`` lists values the caller needs (e.g. ``{"nfe": 5, "solver": "ipndm"}``)."""
    p = Path(path)
    if p.is_file() and p.suffix != ".json":
        if looks_like_pickle(p, p.read_bytes()[:8]):
            raise GridError(f"{p} looks like a pickle (torch.save / pickle.dump) file. epd never unpickles: loading "
                            "a pickle runs arbitrary code. A grid is NAME.json; re-export it with "
                            "epd.solvers.save_grid.")
        raise GridError(f"{p}: a grid is a NAME.json file, got a {p.suffix or 'suffix-less'} file")
    p = grid_path(p)
    if not p.is_file():
        raise GridError(f"grid file missing: {p}")
    if looks_like_pickle(p, p.read_bytes()[:8]):
        raise GridError(f"{p} is a pickle, not JSON. epd never unpickles: loading a pickle runs arbitrary code.")
    header = read_json_header(p, FORMAT, GridError, "an epd solver grid")
    if header.get("format_version") != FORMAT_VERSION:
        raise GridError(f"{p}: unsupported format_version {header.get('format_version')!r}")
    unknown = sorted(set(header) - _KEYS)
    if unknown:
        raise GridError(f"{p}: unknown keys {unknown}")
    missing = sorted({"solver", "grid", "nfe", "schedule"} - set(header))
    if missing:
        raise GridError(f"{p}: lacks {missing}")
    conditions = header.get("conditions")
    try:
        grid = SolverGrid(solver=header["solver"],
                          grid=tuple(header["grid"]) if isinstance(header["grid"], list) else header["grid"],
                          afs=header.get("afs", False), backbone=header.get("backbone", ""),
                          schedule=header["schedule"],
                          conditions=tuple(conditions) if isinstance(conditions, list) else conditions).validate()
    except GridError as e:
        raise GridError(f"{p}: {e}") from None
    if header["nfe"] != grid.nfe:
        raise GridError(f"{p}: nfe={header['nfe']!r} but a {grid.solver} grid of {len(grid.grid)} points "
                        f"(afs={grid.afs}) makes {grid.nfe} calls")
    for key, want in (expect or {}).items():
        have = getattr(grid, key, None)
        if have != (tuple(want) if isinstance(want, list) else want):
            raise GridError(f"{p}: grid has {key}={have!r}, expected {want!r}")
    return grid


class GridParams(torch.nn.Module):
    """Unconstrained parameters of a grid σ_0 > … > σ_{N−1} > 0 with both ends fixed; ``forward()`` is the grid.

    The log-σ range L = log σ_0 − log σ_{N−1} is cut into N − 1 increments, fractions f = ε/(N−1) + (1 − ε)·softmax(z)
    of it, so every iterate is strictly decreasing whatever z is (the floor ε keeps each step a resolvable ratio
    e^{εL/(N−1)} even where the softmax underflows), σ_0 and σ_{N−1} are the start's to the last bit, and the
    interior σ_i = σ_0 · e^{−L·(f_0 + … + f_{i−1})}.
    """

    def __init__(self, start: torch.Tensor, floor: float = 1e-3):
        super().__init__()
        start = torch.as_tensor(start, dtype=torch.float64).detach()
        if start.ndim != 1 or len(start) < 2 or not bool((start > 0).all()) or not bool((start[:-1] > start[1:]).all()):
            raise ValueError(f"a learnable grid starts from a positive, strictly decreasing grid, got {start.tolist()}")
        if not 0 <= floor < 1:
            raise ValueError(f"floor must be in [0, 1), got {floor}")
        self.floor = floor
        self.register_buffer("ends", start[[0, -1]].clone())
        logs = start.log()
        fractions = -torch.diff(logs) / (logs[0] - logs[-1])
        share = ((fractions - floor / len(fractions)) / (1 - floor)).clamp_min(1e-12)
        self.logits = torch.nn.Parameter(share.log())

    def fractions(self) -> torch.Tensor:
        n = self.logits.shape[0]
        return self.floor / n + (1 - self.floor) * torch.softmax(self.logits, 0)

    def forward(self) -> torch.Tensor:
        hi, lo = self.ends[0], self.ends[1]
        span = hi.log() - lo.log()
        interior = torch.exp(hi.log() - span * self.fractions().cumsum(0)[:-1])
        return torch.cat([hi.reshape(1), interior, lo.reshape(1)])


__all__ = ["FORMAT", "FORMAT_VERSION", "GridError", "GridParams", "SolverGrid", "grid_path", "is_grid_file",
           "load_grid", "save_grid"]
