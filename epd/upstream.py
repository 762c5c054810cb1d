"""The EPD authors' published solver tables (github.com/BeierZhu/EPD) as epd tables.

Their tables are ``torch_utils.persistence`` snapshots: ``pickle.dump(dict(model=EPD_predictor, ...))``, an
``nn.Module`` whose pickle embeds the source of its module (the original loader runs it). They are read here with
:func:`epd.pickled.read_pickle`, which records the predictor's state and runs nothing. Branch ``EPD-Solver`` holds
pixel-space tables (CIFAR-10, FFHQ, ImageNet-64, LSUN Bedroom; EPD and the iPNDM plugin) whose snapshots also carry
the loss object with the training grid ``t_steps``; branch ``EPD-Solver++`` holds text-to-image tables (SD1.5, SD3,
FLUX.1) that name their ``backend``.

The predictor stores raw parameters of shape [N − 1, K]; its ``forward`` maps them as

    positions r = sigmoid(r_params)         weights λ = softmax(weight_s) over the K points
    scale c or a = 1 − b + 2b·sigmoid(½·p)  for the bound b = scale_dir / scale_time > 0, else 1

and its samplers (``epd_parallel_sampler``, ``ipndm_sampler``) take the same step as :func:`epd.solvers.sample_epd`
(EPD-Plugin with Adams–Bashforth order ``max_order``), with ``fcn`` resetting the last step's direction scales to 1.
Two conventions of theirs are kept by default (``TableMeta.afs_convention = "upstream"``: d_0 = x_0 / sqrt(1 + σ_0²);
the grid they trained on). Grids:

- pixel-space tables: the snapshot's ``t_steps``, stored as the table's own grid (``schedule="explicit"``); their
  float32 ``time_uniform`` grid ends at 0.00201 rather than σ_min = 0.002 (cancellation in exp(x) − 1);
- SD1.5 (backend ``ldm``): timesteps linear from 999 to 0, i.e. ``schedules.discrete(n, spacing="linspace")`` (σ
  interpolated between training steps as diffusers does; upstream's LDM wrapper interpolates log ᾱ, ≤ 1.3·10⁻⁵ apart);
- SD3: diffusers' flow-matching grid with SD3-Medium's shift 3 (``schedules.flow_match(n, shift=3)``);
- FLUX.1: the same scheduler with dynamic shifting at the recorded μ (``schedules.flow_match(n, mu=μ)``).

Positions are not sorted in most pixel-space tables; epd's tables are, so each step's K points are sorted by r
together with their weights and scales (the update is a sum over points: the same solver).
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import torch

from . import schedules
from .pickled import Inert, PersistentObject, module_tensors, read_pickle
from .solvers.table import AFS_CONVENTIONS, EXPLICIT, SolverTable, TableError, TableMeta, save_table

__all__ = ["BACKBONE_OF_BACKEND", "UpstreamError", "import_table", "read_snapshot", "write_imported_table"]

SNAPSHOT_CLASS = "EPD_predictor"
PARAMS = ("r_params", "weight_s", "scale_dir_params", "scale_time_params")
REQUIRED = ("num_steps", "num_points", "sampler_stu", "max_order", "afs", "scale_dir", "scale_time", "fcn",
            "schedule_type", "schedule_rho", "dataset_name", "guidance_type", "guidance_rate")
# Attributes the import turns into the table and its metadata; the predictor's other plain attributes are recorded
# as provenance (teacher, M, alpha, predict_x0, lower_order_final, img_resolution, ...).
MAPPED = {*REQUIRED, "backend", "backend_config", "sigma_min", "sigma_max", "flowmatch_mu", "flowmatch_shift"}
BACKBONE_OF_BACKEND = {"ldm": "sd15", "sd3": "sd3", "flux": "flux"}
NUM_TRAIN_TIMESTEPS = 1000
SD3_SHIFT = 3.0   # SD3-Medium's scheduler shift; the SD3 tables record its σ_min = shifted 1/1000
# FLUX.1's dynamic shifting (diffusers' calculate_shift with its scheduler config), for a snapshot without μ.
FLUX_SHIFT = {"base_seq_len": 256, "max_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}


class UpstreamError(TableError):
    """An upstream snapshot is malformed, foreign, or not something epd can map."""


def _plain(value: Any) -> Any:
    """JSON-able copies of plain values; anything else (tensors, recorded objects) is None."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return None if any(i is None and v is not None for i, v in zip(items, value)) else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v) for k, v in value.items()}
    return None


def _attributes(obj: PersistentObject) -> dict[str, Any]:
    """An object's public plain attributes (what ``__init__`` set), without torch's module bookkeeping."""
    out = {}
    for key, value in obj.state.items():
        if key.startswith("_") or key == "training" or isinstance(value, (torch.Tensor, Inert, PersistentObject)):
            continue
        plain = _plain(value)
        if plain is not None or value is None:
            out[key] = plain
    return out


def read_snapshot(path: str | os.PathLike) -> dict[str, Any]:
    """The raw content of an upstream snapshot, read without running it: the four float32 [N − 1, K] parameters
    (``r_params``, ``weight_s``, ``scale_dir_params``, ``scale_time_params``), the predictor's plain attributes
    (``num_steps``, ``num_points``, ``sampler_stu``, ``max_order``, ``afs``, ``scale_dir``, ``scale_time``,
    ``schedule_type``, ``backend``, ...), and from the EPD-Solver branch's loss object its training grid
    ``t_steps`` (a tensor) and its plain attributes under ``loss_fn``.

    Raises :class:`UpstreamError` naming the file and the problem: not a pickle, not an EPD snapshot (no ``model``,
    another class), a missing attribute or parameter, a wrong shape, NaN or inf.
    """
    path = Path(path)
    try:
        top = read_pickle(path)
    except (OSError, ValueError) as e:
        raise UpstreamError(f"cannot read {path} as an EPD snapshot: {e}") from None
    if not isinstance(top, dict) or "model" not in top:
        what = f"a dict with keys {sorted(map(str, top))}" if isinstance(top, dict) else type(top).__name__
        raise UpstreamError(f"{path} is not an EPD snapshot: expected a dict with a 'model' entry, got {what}")
    model = top["model"]
    if not isinstance(model, PersistentObject):
        raise UpstreamError(f"{path}: 'model' is not a torch_utils.persistence object (got {model!r}); "
                            f"not an EPD snapshot")
    if model.class_name != SNAPSHOT_CLASS:
        raise UpstreamError(f"{path}: 'model' is a {model.class_name!r}, not an {SNAPSHOT_CLASS!r} (foreign snapshot)")
    attrs = _attributes(model)
    missing = [k for k in REQUIRED if k not in model.state]
    if missing:
        raise UpstreamError(f"{path}: the {SNAPSHOT_CLASS} lacks attribute(s) {missing}")
    steps, k = attrs.get("num_steps"), attrs.get("num_points")
    for name, value, low in (("num_steps", steps, 2), ("num_points", k, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UpstreamError(f"{path}: {name}={model.state.get(name)!r} is not an integer >= {low}")
    tensors = module_tensors(model)
    absent = [p for p in PARAMS if p not in tensors]
    if absent:
        raise UpstreamError(f"{path}: the {SNAPSHOT_CLASS} lacks parameter(s) {absent}")
    raw: dict[str, Any] = {}
    for name in PARAMS:
        t = tensors[name]
        if tuple(t.shape) != (steps - 1, k):
            raise UpstreamError(f"{path}: {name} has shape {tuple(t.shape)}, expected [num_steps - 1, num_points] = "
                                f"[{steps - 1}, {k}]")
        if not t.is_floating_point():
            raise UpstreamError(f"{path}: {name} has dtype {t.dtype}, expected a floating-point tensor")
        if bool(torch.isnan(t).any()) or not bool(torch.isfinite(t).all()):
            raise UpstreamError(f"{path}: {name} contains NaN or inf")
        raw[name] = t.detach().clone()
    raw.update(attrs)
    loss = top.get("loss_fn")
    if isinstance(loss, PersistentObject):
        raw["loss_fn"] = _attributes(loss)
        t_steps = loss.state.get("t_steps")
        if t_steps is not None:
            if not isinstance(t_steps, torch.Tensor) or tuple(t_steps.shape) != (steps,):
                raise UpstreamError(f"{path}: loss_fn.t_steps should be a tensor of num_steps={steps} values, got "
                                    f"{tuple(t_steps.shape) if isinstance(t_steps, torch.Tensor) else t_steps!r}")
            g = t_steps.detach().double()
            if not bool(torch.isfinite(g).all()) or bool((g <= 0).any()) or bool((g[1:] >= g[:-1]).any()):
                raise UpstreamError(f"{path}: loss_fn.t_steps must be finite, positive and strictly decreasing, got "
                                    f"{g.tolist()}")
            raw["t_steps"] = t_steps.detach().clone()
    return raw


def _bound(path: Path, raw: dict[str, Any], name: str) -> float:
    b = raw[name]
    if not isinstance(b, (int, float)) or isinstance(b, bool) or not 0 <= b < 1:
        raise UpstreamError(f"{path}: {name}={b!r} is not a scale bound in [0, 1)")
    return float(b)


def _scale(params: torch.Tensor, bound: float) -> torch.Tensor:
    if bound == 0:
        return torch.ones_like(params)
    return 1 - bound + 2 * bound * torch.sigmoid(0.5 * params)


def _flux_mu(raw: dict[str, Any]) -> float:
    cfg = raw.get("backend_config") or {}
    mu = raw.get("flowmatch_mu", cfg.get("flowmatch_mu"))
    if mu is None:   # upstream then derives it from the resolution, as FluxPipeline does
        res = cfg.get("resolution", 1024)
        seq = (int(res) // 16) ** 2
        f = FLUX_SHIFT
        slope = (f["max_shift"] - f["base_shift"]) / (f["max_seq_len"] - f["base_seq_len"])
        mu = f["base_shift"] + slope * (seq - f["base_seq_len"])
    return float(mu)


def _grid(path: Path, raw: dict[str, Any], backend: str | None) -> tuple[str, dict[str, Any], torch.Tensor]:
    """(schedule, schedule_args, grid) of the table: what upstream's ``get_schedule`` builds for it."""
    n, kind, rho = raw["num_steps"], raw["schedule_type"], raw["schedule_rho"]
    cfg = raw.get("backend_config") or {}
    if backend is None:
        if "t_steps" not in raw:
            raise UpstreamError(f"{path}: a pixel-space snapshot without its training grid (loss_fn.t_steps); "
                                f"epd imports the grid the table was trained on")
        return EXPLICIT, {}, raw["t_steps"].double()
    if backend == "ldm":
        if kind != "discrete" or rho != 1:
            raise UpstreamError(f"{path}: SD1.5 (backend 'ldm') tables use schedule_type 'discrete' with "
                                f"schedule_rho 1, got {kind!r}, {rho!r}")
        args = {"spacing": "linspace"}
        return "discrete", args, schedules.discrete(n, **args)
    if kind != "flowmatch":
        raise UpstreamError(f"{path}: backend {backend!r} tables use schedule_type 'flowmatch', got {kind!r}")
    lo, hi = raw.get("sigma_min", cfg.get("sigma_min")), raw.get("sigma_max", cfg.get("sigma_max"))
    if backend == "sd3":
        args = {"shift": SD3_SHIFT, "num_train_timesteps": NUM_TRAIN_TIMESTEPS}
        t_min = SD3_SHIFT / NUM_TRAIN_TIMESTEPS / (1 + (SD3_SHIFT - 1) / NUM_TRAIN_TIMESTEPS)
    else:
        args = {"mu": _flux_mu(raw), "num_train_timesteps": NUM_TRAIN_TIMESTEPS}
        t_min = 1 / NUM_TRAIN_TIMESTEPS
    for name, have, want in (("sigma_min", lo, t_min), ("sigma_max", hi, 1.0)):
        if have is not None and not math.isclose(float(have), want, rel_tol=1e-6):
            raise UpstreamError(f"{path}: {backend} table records {name}={have!r}, but its scheduler has {want!r} "
                                f"(another scheduler config?)")
    return "flow_match", args, schedules.flow_match(n, **args)


def import_table(path: str | os.PathLike, *, afs_convention: str = "upstream") -> tuple[SolverTable, dict[str, Any]]:
    """An upstream snapshot as an epd table and its provenance (for :func:`epd.solvers.save_table`).

    The table's tensors are float64 (the exact map of the float32 raw parameters); ``meta.backbone`` is sd15, sd3 or
    flux for the EPD-Solver++ tables and empty for the pixel-space ones (usable with any backbone of their σ range;
    the provenance names the dataset). ``afs_convention`` is "upstream" (what the table was trained with) or "epd".
    """
    path = Path(path)
    if afs_convention not in AFS_CONVENTIONS:
        raise ValueError(f"afs_convention must be one of {AFS_CONVENTIONS}, got {afs_convention!r}")
    raw = read_snapshot(path)
    solver = raw["sampler_stu"]
    if solver not in ("epd", "ipndm"):
        raise UpstreamError(f"{path}: sampler_stu={solver!r} is neither 'epd' (EPD-Solver) nor 'ipndm' (EPD-Plugin)")
    plugin = solver == "ipndm"
    order = raw["max_order"]
    if plugin and (not isinstance(order, int) or isinstance(order, bool) or not 1 <= order <= 4):
        raise UpstreamError(f"{path}: max_order={order!r} is not an iPNDM order in 1-4")
    if not isinstance(raw["afs"], bool) or not isinstance(raw["fcn"], bool):
        raise UpstreamError(f"{path}: afs={raw['afs']!r} and fcn={raw['fcn']!r} must be booleans")
    b_dir, b_time = _bound(path, raw, "scale_dir"), _bound(path, raw, "scale_time")
    backend = raw.get("backend") or ("ldm" if raw["dataset_name"] == "ms_coco" else None)
    if backend is not None and backend not in BACKBONE_OF_BACKEND:
        raise UpstreamError(f"{path}: unknown backend {backend!r}; expected one of {sorted(BACKBONE_OF_BACKEND)}")
    schedule, schedule_args, grid = _grid(path, raw, backend)

    r = torch.sigmoid(raw["r_params"].double())
    lam = torch.softmax(raw["weight_s"].double(), dim=-1)
    c = _scale(raw["scale_dir_params"].double(), b_dir)
    a = _scale(raw["scale_time_params"].double(), b_time)
    if raw["fcn"]:
        c[-1] = 1.0
    order_k = r.argsort(dim=-1, stable=True)
    r, lam, c, a = (t.gather(-1, order_k) for t in (r, lam, c, a))
    same = (r[:, 1:] == r[:, :-1]).nonzero()
    if len(same):
        raise UpstreamError(f"{path}: step {int(same[0, 0])} has two points at the same position r = "
                            f"{float(r[same[0, 0], same[0, 1]])}; epd's tables need distinct positions")
    unsorted = [n for n in range(len(order_k)) if order_k[n].tolist() != sorted(order_k[n].tolist())]

    guided = raw["guidance_type"] == "cfg"
    meta = TableMeta(
        num_steps=raw["num_steps"], num_points=raw["num_points"], schedule=schedule,
        sigma_min=float(grid[-1]), sigma_max=float(grid[0]), schedule_args=schedule_args,
        afs=raw["afs"], plugin=plugin, plugin_order=order if plugin else TableMeta.plugin_order,
        scale_bound=max(b_dir, b_time), backbone=BACKBONE_OF_BACKEND.get(backend, ""),
        guidance=float(raw["guidance_rate"]) if guided else 1.0, afs_convention=afs_convention,
        grid=grid.tolist() if schedule == EXPLICIT else None,
    )
    try:
        table = SolverTable(positions=r, weights=lam, scale_dir=c, scale_time=a, meta=meta).validate()
    except TableError as e:
        raise UpstreamError(f"{path}: the mapped table is not valid: {e}") from None

    cfg = raw.get("backend_config")
    provenance = {
        "source": {
            "file": path.name,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "format": "torch_utils.persistence pickle (github.com/BeierZhu/EPD), read without running it",
            "class": SNAPSHOT_CLASS,
        },
        "dataset": raw["dataset_name"],
        "backend": raw.get("backend"),
        "backend_config": cfg,
        "sampler": solver,
        "scale_bounds": {"scale_dir": b_dir, "scale_time": b_time},
        "guidance_type": raw["guidance_type"],
        "guidance_rate": raw["guidance_rate"],
        "schedule_type": raw["schedule_type"],
        "schedule_rho": raw["schedule_rho"],
        "max_order": order,
        "fcn": raw["fcn"],
        "grid_source": ("loss_fn.t_steps" if schedule == EXPLICIT else f"{schedule} {schedule_args}"),
        "sorted_steps": unsorted,
        "unused_attributes": {k: v for k, v in raw.items()
                              if k not in MAPPED and k not in PARAMS and k not in ("t_steps", "loss_fn")},
        "mapping": "positions = sigmoid(r_params), weights = softmax(weight_s), scale = 1 - b + 2b*sigmoid(p/2) "
                   "(b > 0) else 1; each step's points sorted by position",
    }
    if "loss_fn" in raw:
        provenance["loss_fn"] = raw["loss_fn"]
    return table, provenance


def write_imported_table(path: str | os.PathLike, stem: str | os.PathLike, *,
                         afs_convention: str = "upstream") -> Path:
    """Import an upstream snapshot and write it as ``STEM.safetensors`` + ``STEM.json`` (float32 tensors, metadata
    and provenance); returns the JSON path. Nothing is written if the snapshot is refused."""
    table, provenance = import_table(path, afs_convention=afs_convention)
    return save_table(table, stem, provenance=provenance)
