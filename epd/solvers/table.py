"""The EPD solver table: per-step positions, simplex weights and bounded scales, plus the metadata that says which
grid, backbone and NFE they belong to.

On disk a table is two files side by side: ``NAME.safetensors`` (the four tensors) and ``NAME.json`` (the metadata
and the SHA-256 of the tensor file). Both are readable without running any code; nothing here unpickles.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .. import schedules
from ..io import atomic_write, looks_like_pickle, read_json_header

FORMAT = "epd-solver-table"
FORMAT_VERSION = 1
TENSORS = ("positions", "weights", "scale_dir", "scale_time")
SIMPLEX_TOL = 1e-5


class TableError(ValueError):
    """A solver table (or its file) is malformed or does not fit what it is used with."""


# JSON type of each TableMeta field (annotations are strings under ``from __future__ import annotations``).
_META_TYPES: dict[str, Any] = {"int": int, "float": (int, float), "str": str, "bool": bool, "dict[str, Any]": dict,
                               "list[float] | None": (list, type(None))}
# How AFS (the analytic first step) forms step 0's direction without a denoiser call: "epd" takes the data mean 0 as
# D, so d_0 = x_0 / σ_0; "upstream" is the EPD authors' d_0 = x_0 / sqrt(1 + σ_0²) (their published tables use it).
AFS_CONVENTIONS = ("epd", "upstream")
EXPLICIT = "explicit"   # schedule name of a table whose grid is only its own ``grid`` (e.g. imported from upstream)


@dataclass(frozen=True)
class TableMeta:
    """What a table was made for. ``nfe`` is derived and checked, never free."""

    num_steps: int                 # grid points N, so N − 1 steps
    num_points: int                # K intermediate points per step
    schedule: str = "polynomial"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    schedule_args: dict[str, Any] = field(default_factory=dict)  # e.g. {"shift": 3.0} for flow_match
    afs: bool = True
    plugin: bool = False           # EPD-Plugin: intermediate points from the iPNDM direction
    plugin_order: int = 4          # its Adams–Bashforth order (≤ 4)
    scale_bound: float = 0.05      # scale_dir and scale_time lie in [1 − bound, 1 + bound]
    backbone: str = ""
    guidance: float = 1.0
    afs_convention: str = "epd"    # one of AFS_CONVENTIONS
    grid: list[float] | None = None  # the table's own grid (σ_0 > … > σ_{N−1}), overriding the named schedule

    @property
    def nfe(self) -> int:
        """Sequential denoiser calls: one at each step's start, one batched call for its K points, minus AFS."""
        return 2 * (self.num_steps - 1) - int(self.afs)

    def sigmas(self) -> torch.Tensor:
        """The grid this table was made for: its own ``grid`` if it carries one, else the named schedule's."""
        if self.grid is not None:
            return torch.tensor(self.grid, dtype=torch.float64)
        return schedules.get_sigmas(
            self.schedule, self.num_steps, self.sigma_min, self.sigma_max, self.rho, **self.schedule_args
        )

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "nfe": self.nfe}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TableMeta":
        if not isinstance(data, dict):
            raise TableError(f"table metadata must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        nfe = data.pop("nfe", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TableError(f"table metadata has unknown keys {unknown}")
        try:
            meta = cls(**data)
        except TypeError as e:
            raise TableError(f"table metadata is incomplete: {e}") from None
        for f in dataclasses.fields(cls):
            v, kind = getattr(meta, f.name), _META_TYPES.get(f.type, object)
            ok = isinstance(v, bool) if kind is bool else (isinstance(v, kind) and not isinstance(v, bool))
            if not ok:
                raise TableError(f"table metadata has wrong type: {f.name}={v!r} should be {f.type}")
        if nfe is not None and nfe != meta.nfe:
            raise TableError(
                f"metadata mismatch: nfe={nfe} but num_steps={meta.num_steps}, afs={meta.afs} give {meta.nfe}"
            )
        return meta


@dataclass
class SolverTable:
    """Tensors of shape [S, K] (one table) or [B, S, K] (one table per sample, as RL draws them); S = N − 1."""

    positions: torch.Tensor   # r_k ∈ (0, 1), increasing in k: τ_k = σ_{n+1}^{r_k} · σ_n^{1 − r_k}
    weights: torch.Tensor     # λ_k ≥ 0, Σ_k λ_k = 1
    scale_dir: torch.Tensor   # c_k, multiplies direction k
    scale_time: torch.Tensor  # a_k, the denoiser sees σ = a_k · τ_k
    meta: TableMeta

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in TENSORS}

    def step(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The [B or 1, K] rows of step n, in the order (positions, weights, scale_dir, scale_time)."""
        return tuple(t[..., n, :].reshape(-1, t.shape[-1]) for t in self.tensors().values())

    def validate(self) -> "SolverTable":
        """Check shapes, finiteness, ranges and metadata; raise :class:`TableError` naming the first problem."""
        m = self.meta
        if m.num_steps < 2 or m.num_points < 1:
            raise TableError(f"metadata: need num_steps >= 2 and num_points >= 1, got {m.num_steps}, {m.num_points}")
        if m.schedule not in schedules.SCHEDULES and m.schedule != EXPLICIT:
            raise TableError(f"metadata: unknown schedule {m.schedule!r}; expected one of "
                             f"{sorted(schedules.SCHEDULES)} or {EXPLICIT!r} (with a grid)")
        if m.afs_convention not in AFS_CONVENTIONS:
            raise TableError(f"metadata: afs_convention must be one of {AFS_CONVENTIONS}, got {m.afs_convention!r}")
        _check_grid(m)
        if not 1 <= m.plugin_order <= 4:
            raise TableError(f"metadata: plugin_order must be 1-4, got {m.plugin_order}")
        if not 0 <= m.scale_bound < 1:
            raise TableError(f"metadata: scale_bound must be in [0, 1), got {m.scale_bound}")
        expected = (m.num_steps - 1, m.num_points)
        for name, t in self.tensors().items():
            if not isinstance(t, torch.Tensor):
                raise TableError(f"{name} is not a tensor")
            if t.ndim not in (2, 3) or tuple(t.shape[-2:]) != expected:
                raise TableError(
                    f"wrong shape: {name} has shape {tuple(t.shape)}, expected [(B,) {expected[0]}, {expected[1]}]"
                    f" for num_steps={m.num_steps}, num_points={m.num_points}"
                )
            if bool(torch.isnan(t).any()):
                raise TableError(f"{name} contains NaN")
            if not bool(torch.isfinite(t).all()):
                raise TableError(f"{name} contains inf")
        shapes = {tuple(t.shape) for t in self.tensors().values()}
        if len(shapes) != 1:
            raise TableError(f"the four tensors must share one shape, got {sorted(shapes)}")
        r, w = self.positions.detach(), self.weights.detach()
        if bool(((r <= 0) | (r >= 1)).any()):
            raise TableError("positions must lie strictly inside (0, 1)")
        if bool((r[..., 1:] <= r[..., :-1]).any()):
            raise TableError("positions must be strictly increasing within each step (unordered positions)")
        if bool((w < 0).any()):
            raise TableError("weights off the simplex: some weight is negative")
        if bool(((w.sum(-1) - 1).abs() > SIMPLEX_TOL).any()):
            raise TableError(f"weights off the simplex: a step's weights do not sum to 1 (within {SIMPLEX_TOL})")
        for name in ("scale_dir", "scale_time"):
            s = getattr(self, name).detach()
            if bool(((s - 1).abs() > m.scale_bound + 1e-6).any()):
                raise TableError(f"{name} must lie in [1 - {m.scale_bound}, 1 + {m.scale_bound}] (scale_bound)")
        return self


def _check_grid(m: TableMeta) -> None:
    if m.grid is None:
        if m.schedule == EXPLICIT:
            raise TableError(f"metadata: schedule {EXPLICIT!r} needs the table's own grid, and it has none")
        return
    g = m.grid
    if len(g) != m.num_steps or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in g):
        raise TableError(f"metadata: grid must list num_steps={m.num_steps} numbers, got {g!r}")
    if not all(math.isfinite(v) and v > 0 for v in g) or any(a <= b for a, b in zip(g, g[1:])):
        raise TableError(f"metadata: grid must be finite, positive and strictly decreasing, got {g!r}")
    if not (math.isclose(g[0], m.sigma_max, rel_tol=1e-9) and math.isclose(g[-1], m.sigma_min, rel_tol=1e-9)):
        raise TableError(f"metadata: grid runs from {g[0]!r} to {g[-1]!r}, but sigma_max={m.sigma_max!r} and "
                         f"sigma_min={m.sigma_min!r}")


def handset_table(
    num_steps: int, num_points: int = 2, *, plugin: bool = False, **meta: Any
) -> SolverTable:
    """A hand-set starting table: Gauss–Legendre nodes in log σ as positions, their weights, unit scales.

    With K = 1 this is the geometric midpoint with weight 1, i.e. DPM-Solver-2.
    """
    import numpy as np

    nodes, gl_weights = np.polynomial.legendre.leggauss(num_points)
    r = torch.tensor((nodes + 1) / 2, dtype=torch.float32)
    w = torch.tensor(gl_weights / 2, dtype=torch.float32)
    steps = num_steps - 1
    ones = torch.ones(steps, num_points)
    table = SolverTable(
        positions=r.expand(steps, -1).clone(),
        weights=w.expand(steps, -1).clone(),
        scale_dir=ones.clone(),
        scale_time=ones.clone(),
        meta=TableMeta(num_steps=num_steps, num_points=num_points, plugin=plugin, **meta),
    )
    return table.validate()


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".json", ".safetensors") else p
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_table(table: SolverTable, path: str | os.PathLike, provenance: dict[str, Any] | None = None) -> Path:
    """Write ``PATH.safetensors`` and ``PATH.json`` (each to a temporary name, then renamed); returns the JSON path.

    ``provenance`` (how the table was made: config, teacher, final loss…) is stored in the JSON for people and
    tools; loading ignores it.
    """
    table.validate()
    st_path, json_path = _paths(path)
    st_path.parent.mkdir(parents=True, exist_ok=True)
    blob = st_save({k: v.detach().float().contiguous().cpu() for k, v in table.tensors().items()})
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tensors_file": st_path.name,
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        "meta": table.meta.to_json(),
    }
    if provenance is not None:
        header["provenance"] = provenance
    atomic_write(st_path, blob)
    atomic_write(json_path, (json.dumps(header, indent=2) + "\n").encode())
    return json_path


def _refuse_pickle(path: Path, head: bytes) -> None:
    if looks_like_pickle(path, head):
        raise TableError(
            f"{path} looks like a pickle (torch.save / pickle.dump) file. epd never unpickles: loading a pickle runs "
            "arbitrary code. Tables are NAME.safetensors + NAME.json; re-export the table with epd.solvers.save_table "
            "(a snapshot of the EPD authors' code is converted with epd.upstream.write_imported_table)."
        )


def load_table(path: str | os.PathLike, expect: dict[str, Any] | None = None) -> SolverTable:
    """Load and validate a table; ``expect`` lists metadata values the caller needs (e.g. ``{"num_steps": 4}``)."""
    p = Path(path)
    if p.exists() and p.is_file() and p.suffix not in (".json", ".safetensors"):
        _refuse_pickle(p, p.read_bytes()[:8])
        raise TableError(f"{p}: a table is NAME.json + NAME.safetensors, got a {p.suffix or 'suffix-less'} file")
    st_path, json_path = _paths(p)
    for f in (json_path, st_path):
        if not f.exists():
            raise TableError(f"table file missing: {f}")
    for f in (json_path, st_path):
        _refuse_pickle(f, f.read_bytes()[:8])
    header = read_json_header(json_path, FORMAT, TableError, "an epd solver table")
    if header.get("format_version") != FORMAT_VERSION:
        raise TableError(f"{json_path}: unsupported format_version {header.get('format_version')!r}")
    blob = st_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != header.get("tensors_sha256"):
        raise TableError(f"{st_path} does not match the checksum in {json_path.name} (truncated, corrupt or replaced)")
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError) as e:
        raise TableError(f"{st_path} is not a readable safetensors file: {e}") from None
    missing = [k for k in TENSORS if k not in tensors]
    if missing:
        raise TableError(f"{st_path} lacks tensors {missing}")
    meta = TableMeta.from_json(header.get("meta", {}))
    table = SolverTable(**{k: tensors[k] for k in TENSORS}, meta=meta).validate()
    for key, want in (expect or {}).items():
        have = meta.nfe if key == "nfe" else getattr(meta, key, None)
        if isinstance(want, float) or isinstance(have, float):
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (have, want))
            same = numeric and math.isclose(float(have), float(want), rel_tol=1e-6)
        else:
            same = have == want
        if not same:
            raise TableError(f"metadata mismatch: table has {key}={have!r}, expected {want!r}")
    return table
