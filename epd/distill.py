"""Stage 1: fit an EPD table so the student's trajectory follows the teacher's (Zhu et al., §3.2).

The table is reparametrised so every iterate is valid: positions are the first K cumulative sums of a softmax over
K + 1 segments (ordered, inside (0, 1)), weights a softmax, scales ``1 + bound · tanh(u)``. Each iteration runs the
student over the whole grid from the teacher's start states and sums the per-step distances to the teacher's states.
Earlier steps are **not** detached: gradients flow through the whole trajectory, so a step's parameters also learn
from the errors they cause later (upstream trains step by step on detached inputs; end-to-end gives lower final
error here at the same cost). Adam with a cosine learning rate; checkpoints hold the parameters, the optimiser, the
batch RNG and the loss history, so a resumed run is identical to an uninterrupted one.

``learn_grid`` also fits the grid's interior σ (ends fixed, strictly decreasing: :class:`GridParams`), the idea of
S4S-Alt (Frankel et al. 2025) of learning solver and grid together. The teacher holds states only at the start
grid's points, so once the grid moves only the final state (σ_min never moves) is comparable: the first
``grid_warmup`` of the iterations fit the table on the start grid with the whole trajectory loss, the rest fit table
and grid jointly on the final-state distance. (Targets interpolated to the moved points mislead the grid; joint
final-state fitting from the first iteration lands in a worse optimum.) The table keeps the teacher's schedule name
and carries the learned grid (``meta.grid``), so it belongs to the same config and overrides the schedule's points.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import tracking
from .backbones import load_backbone
from .io import atomic_write, code_version, load_optimizer, optimizer_tensors, set_aside
from .options import Field
from .solvers import SolverTable, handset_table, sample_epd, save_table
from .solvers.common import select_rows
from .solvers.grid import GridParams
from .solvers.plan import plan_for_nfe
from .teacher import TeacherConfig, load_manifest, load_teacher


@dataclass(frozen=True)
class DistillOptions:
    """Stage 1 (config section ``distill``): how a table is fitted to the teacher."""

    num_points: Annotated[int, Field(ge=1, description="K, parallel points per step")] = 2
    plugin: Annotated[bool, Field(description="EPD-Plugin: the K points from the iPNDM direction")] = False
    plugin_order: Annotated[int, Field(ge=1, le=4, description="Adams-Bashforth order of EPD-Plugin")] = 4
    scale_bound: Annotated[float, Field(ge=0, lt=1, description="learned scales stay in [1 - bound, 1 + bound]")] = 0.2
    iterations: Annotated[int, Field(ge=1, description="Adam steps")] = 1000
    batch: Annotated[int, Field(ge=1, description="teacher trajectories per step")] = 128
    lr: Annotated[float, Field(gt=0, description="peak learning rate (cosine schedule)")] = 0.1
    lr_min_ratio: Annotated[float, Field(gt=0, le=1, description="the cosine ends at lr x this")] = 0.01
    final_weight: Annotated[float, Field(ge=0, description="weight of the last step's distance (the others: 1)")] = 1.0
    seed: Annotated[int, Field(ge=0, description="initialisation and batch order")] = 0
    checkpoint_every: Annotated[int, Field(ge=1, description="iterations between resumable checkpoints")] = 100
    start_tables: Annotated[dict[int, str], Field(description="NFE -> a table to start from instead of distilling: "
                                                              "an epd table (NAME.json) or an EPD authors' snapshot "
                                                              "(.pkl); Snakemake then runs no teacher for that NFE "
                                                              "unless a peer (pipeline.peers) reads it")] = \
        field(default_factory=dict)
    learn_grid: Annotated[bool, Field(description="also learn the grid's interior sigmas (the table carries its "
                                                  "own grid)")] = False
    grid_lr_scale: Annotated[float, Field(gt=0, description="the grid's learning rate as a multiple of lr")] = 1.0
    grid_warmup: Annotated[float, Field(ge=0, lt=1, description="fraction of the iterations before the grid moves "
                                                                "(fitted on the whole trajectory until then)")] = 0.5

    def grid_moves(self, it: int) -> bool:
        """Whether iteration ``it`` fits the grid (and, the teacher's points having moved, the final state only)."""
        return self.learn_grid and it >= round(self.grid_warmup * self.iterations)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DistillConfig(DistillOptions):
    """A distillation run: the options and the NFE of the table."""

    nfe: Annotated[int, Field(ge=2, description="denoiser calls of the table")] = 5


class TableParams(torch.nn.Module):
    """Unconstrained parameters of a table; :meth:`table` maps them to a valid :class:`SolverTable`, and
    :meth:`sigmas` is its grid (learnable with ``learn_grid``, else the start's)."""

    def __init__(self, start: SolverTable, learn_grid: bool = False):
        super().__init__()
        self.meta = start.meta
        self.register_buffer("start_sigmas", start.meta.sigmas())
        self.grid = GridParams(self.start_sigmas) if learn_grid else None
        r = start.positions.double()
        segments = torch.diff(r, prepend=r.new_zeros(r.shape[:-1] + (1,)), append=r.new_ones(r.shape[:-1] + (1,)))
        self.position_logits = torch.nn.Parameter(segments.log())
        self.weight_logits = torch.nn.Parameter(start.weights.double().log())
        self.dir_raw = torch.nn.Parameter(self._atanh((start.scale_dir.double() - 1) / self.meta.scale_bound))
        self.time_raw = torch.nn.Parameter(self._atanh((start.scale_time.double() - 1) / self.meta.scale_bound))

    @staticmethod
    def _atanh(v: torch.Tensor) -> torch.Tensor:
        return torch.atanh(v.nan_to_num(0.0).clamp(-0.999, 0.999))

    def sigmas(self) -> torch.Tensor:
        return self.start_sigmas if self.grid is None else self.grid()

    def table_parameters(self) -> list[torch.nn.Parameter]:
        return [self.position_logits, self.weight_logits, self.dir_raw, self.time_raw]

    def table(self) -> SolverTable:
        bound = self.meta.scale_bound
        return SolverTable(
            positions=torch.softmax(self.position_logits, -1).cumsum(-1)[..., :-1],
            weights=torch.softmax(self.weight_logits, -1),
            scale_dir=1 + bound * torch.tanh(self.dir_raw),
            scale_time=1 + bound * torch.tanh(self.time_raw),
            meta=self.meta,
        )


def cosine_lr(cfg: DistillConfig, it: int) -> float:
    """The learning rate at iteration ``it`` (a function of the iteration alone, so resuming needs no state)."""
    lo = cfg.lr * cfg.lr_min_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * it / cfg.iterations))


def trajectory_loss(table: SolverTable, denoiser, states: torch.Tensor, sigmas: torch.Tensor, cond,
                    cfg: DistillConfig, final_only: bool = False) -> torch.Tensor:
    """Σ_n w_n · mean |x_n^student − x_n^teacher|², the student started from the teacher's first state; with
    ``final_only`` (a grid that moved off the teacher's points) just the final term, weighted 1."""
    reached = []
    sample_epd(denoiser, states[:, 0], sigmas, table, cond=cond, callback=lambda info: reached.append(info["x"]))
    student = torch.stack(reached, 1)
    per_step = ((student - states[:, 1:]) ** 2).flatten(2).mean(-1).mean(0)   # [N − 1]
    weights = torch.zeros_like(per_step) if final_only else torch.ones_like(per_step)
    weights[-1] = 1.0 if final_only else cfg.final_weight
    return (weights * per_step).sum()


def _checkpoint_paths(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".ckpt.safetensors"), out.with_name(out.name + ".ckpt.json")


def _save_checkpoint(out: Path, params: TableParams, opt: torch.optim.Optimizer, gen: torch.Generator,
                     it: int, losses: list[float], run_hash: str) -> None:
    tensors = {f"param.{k}": v.detach().clone() for k, v in params.state_dict().items()}
    opt_tensors, param_groups = optimizer_tensors(opt)
    tensors.update(opt_tensors)
    tensors["rng"] = gen.get_state()
    tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
    st_path, json_path = _checkpoint_paths(out)
    tmp_st, tmp_json = st_path.with_name(st_path.name + ".tmp"), json_path.with_name(json_path.name + ".tmp")
    save_file(tensors, tmp_st)
    tmp_json.write_text(json.dumps({"iteration": it, "run_hash": run_hash,
                                    "param_groups": param_groups}, indent=2))
    os.replace(tmp_st, st_path)
    os.replace(tmp_json, json_path)


def _load_checkpoint(out: Path, params: TableParams, opt: torch.optim.Optimizer, gen: torch.Generator,
                     run_hash: str) -> tuple[int, list[float]]:
    st_path, json_path = _checkpoint_paths(out)
    if not (st_path.exists() and json_path.exists()):
        return 0, []
    header = json.loads(json_path.read_text())
    if header.get("run_hash") != run_hash:   # another config, teacher or code: kept aside, start over
        tag = f"ckpt-{str(header.get('run_hash'))[:8]}-it{header.get('iteration')}"
        for p in (st_path, json_path):
            set_aside(p, tag)
        print(f"distill: {st_path} belongs to another config, teacher or code version; kept aside ({tag}), "
              f"starting over")
        return 0, []
    tensors = load_file(st_path)
    params.load_state_dict({k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")})
    load_optimizer(opt, tensors, header["param_groups"])
    gen.set_state(tensors["rng"])
    return header["iteration"], tensors["losses"].tolist()


def distill(teacher_dir: str | os.PathLike, out: str | os.PathLike, cfg: DistillConfig,
            expect: dict[str, Any] | None = None, progress: bool = True,
            stop_after: int | None = None) -> SolverTable | None:
    """Fit a table to a teacher directory and write ``OUT.safetensors/.json``, ``OUT.loss.csv`` and ``OUT.loss.png``.

    ``expect`` is checked against the teacher's config before anything is written. ``stop_after`` ends the run
    after that many iterations (as an interruption would) and returns None.
    """
    out = Path(out)
    manifest = load_manifest(teacher_dir)
    tcfg = TeacherConfig(**manifest["config"])
    plan = plan_for_nfe("epd_plugin" if cfg.plugin else "epd", cfg.nfe)
    wanted = {"num_steps": plan.num_steps, **(expect or {})}
    data = load_teacher(teacher_dir, expect=wanted)
    sigmas = tcfg.student_sigmas()
    backbone = load_backbone(tcfg.backbone, **tcfg.backbone_options)
    start = handset_table(plan.num_steps, cfg.num_points, plugin=cfg.plugin, plugin_order=cfg.plugin_order,
                          afs=plan.afs, schedule=tcfg.schedule, sigma_min=tcfg.sigma_min, sigma_max=tcfg.sigma_max,
                          rho=tcfg.rho, schedule_args=tcfg.schedule_args, scale_bound=cfg.scale_bound,
                          backbone=backbone.name,
                          guidance=float(tcfg.backbone_options.get("guidance", 1.0)))
    run_hash = hashlib.sha256(json.dumps([cfg.to_json(), manifest["config_hash"], code_version()],
                                         sort_keys=True).encode()).hexdigest()

    torch.manual_seed(cfg.seed)
    params = TableParams(start, learn_grid=cfg.learn_grid)
    groups = [{"params": params.table_parameters(), "scale": 1.0}]
    if params.grid is not None:
        groups.append({"params": list(params.grid.parameters()), "scale": cfg.grid_lr_scale})
    opt = torch.optim.Adam(groups, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    it, losses = _load_checkpoint(out, params, opt, gen, run_hash)
    logged = 0   # iterations already sent to MLflow; a resumed run sends the checkpoint's history first
    states, cond_ids = data["states"].double(), data["cond_ids"]
    conds = tcfg.conditions()
    # Every label/prompt encoded once; a batch takes its rows (a text encoder call per iteration would dominate).
    all_cond = None if conds is None else tcfg.encode(backbone, torch.arange(len(conds)))
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.iterations, initial=it, desc=f"distill nfe={cfg.nfe}", disable=not progress)
    while it < cfg.iterations:
        idx = torch.randint(len(states), (cfg.batch,), generator=gen)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(cfg, it) * group["scale"]
        moving = cfg.grid_moves(it)
        loss = trajectory_loss(params.table(), backbone, states[idx], params.sigmas() if moving else sigmas,
                               select_rows(all_cond, cond_ids[idx]), cfg, final_only=moving)
        opt.zero_grad()
        loss.backward()
        opt.step()
        it += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3e}")
        if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
            _save_checkpoint(out, params, opt, gen, it, losses, run_hash)
            tracking.log_metric_history("loss", losses[logged:], range(logged + 1, it + 1))
            logged = it
        if stop_after is not None and it >= stop_after and it < cfg.iterations:
            bar.close()
            return None
    bar.close()
    with torch.no_grad():
        table = params.table()
        table = dataclasses.replace(table, **{k: v.detach().float() for k, v in table.tensors().items()})
        if cfg.learn_grid:
            table.meta = dataclasses.replace(table.meta, grid=params.sigmas().tolist())
    save_table(table, out, provenance={"distill": cfg.to_json(), "teacher": str(teacher_dir),
                                       "teacher_config": manifest["config"],
                                       "teacher_config_hash": manifest["config_hash"], "final_loss": losses[-1],
                                       "seconds": time.perf_counter() - t0})
    write_loss_curve(losses, out)
    tracking.log_metrics({"final_loss": losses[-1]})
    for p in _checkpoint_paths(out):
        p.unlink(missing_ok=True)
    return table


def write_loss_curve(losses: list[float], out: Path) -> None:
    """``OUT.loss.csv`` (iteration, loss) and ``OUT.loss.png`` (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path, png_path = out.with_name(out.name + ".loss.csv"), out.with_name(out.name + ".loss.png")
    atomic_write(csv_path, ("iteration,loss\n" + "".join(f"{i + 1},{v:.9g}\n" for i, v in enumerate(losses))).encode())
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.semilogy(range(1, len(losses) + 1), losses)
    ax.set_xlabel("iteration")
    ax.set_ylabel("trajectory loss")
    ax.set_title(out.name)
    fig.tight_layout()
    tmp_png = png_path.with_name(png_path.name + ".tmp.png")
    fig.savefig(tmp_png, dpi=100)
    plt.close(fig)
    os.replace(tmp_png, png_path)


def adopt_table(source: str | os.PathLike, out: str | os.PathLike, nfe: int) -> SolverTable:
    """Take a finished table as this NFE's distilled table: an epd table is checked and written again, an EPD
    authors' snapshot imported (epd.upstream, nothing in the pickle runs); ``OUT.loss.csv`` records no iteration.
    Refused, before anything is written, if its NFE is not ``nfe``."""
    from .solvers import load_table
    from .upstream import import_table

    source, out = Path(source), Path(out)
    if source.suffix in (".json", ".safetensors"):
        table, provenance = load_table(source), {"start_table": str(source)}
    else:
        table, provenance = import_table(source)
    if table.meta.nfe != nfe:
        raise ValueError(f"{source} is a table for NFE {table.meta.nfe}, not {nfe} (distill.start_tables)")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_table(table, out, provenance={**provenance, "adopted_by": "distill.start_tables"})
    write_loss_curve([], out)
    return table


__all__ = ["DistillConfig", "DistillOptions", "TableParams", "adopt_table", "cosine_lr", "distill", "trajectory_loss",
           "write_loss_curve"]
