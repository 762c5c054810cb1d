"""LD3, the learned-grid peer: fit the interior σ of a hand-designed solver's grid to a teacher's endpoints.

Tong et al. (ICLR 2025), "Learning to Discretize Denoising Diffusion ODEs": keep the solver (iPNDM, UniPC, …) and
learn only where it steps. The grid is :class:`~epd.solvers.grid.GridParams` (ends fixed, softmax of log-σ
increments, strictly decreasing at every iterate). The loss is the mean squared distance, in state space, between
the solver's final state from the teacher's noise and the teacher's solution at σ_min: the embedded backbones'
states are 8×8 pixels, where the distance is the quantity the benchmark reports (RMS to the reference), and the
teacher has thousands of trajectories, so LD3's perceptual distance and its slack (a ball around the input noise,
there against over-fitting a few hundred samples with LPIPS) have nothing to add here.

Only the teacher's first and last states are used, so one teacher directory serves every solver and NFE that shares
its σ_max, σ_min, backbone and conditioning. A share of the teacher's samples (``val_fraction``) is held out and the
grid with the lowest loss on them is kept, the start included: the fixed multistep coefficients of iPNDM make the
loss rough in the grid, and Adam can leave a good grid for a much worse one late in a run.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from tqdm import tqdm

from .backbones import load_backbone
from .distill import cosine_lr, write_loss_curve
from .options import Field
from .schedules import SCHEDULES
from .solvers import BASELINES, SolverGrid, save_grid, solver
from .solvers.common import select_rows
from .solvers.grid import GridParams, grid_path
from .solvers.plan import grid_for, plan_for_nfe
from .teacher import TeacherConfig, load_manifest, load_teacher


# Solvers whose grid ends at σ_min, where the teacher's solution is (Heun steps into σ = 0).
LD3_SOLVERS = tuple(name for name in BASELINES if solver(name).budget != "heun")


@dataclass(frozen=True)
class LD3Options:
    """The learned-grid peer (config section ``ld3``): a hand-designed solver's grid fitted to the teacher."""

    solver: Annotated[Literal[LD3_SOLVERS], Field(description="the fixed solver whose grid is learned")] = "ipndm"
    start_schedule: Annotated[Literal[tuple(SCHEDULES)] | None, Field(
        description="schedule of the start grid (none: the teacher's)")] = None
    iterations: Annotated[int, Field(ge=1, description="Adam steps")] = 300
    batch: Annotated[int, Field(ge=1, description="teacher trajectories per step")] = 128
    lr: Annotated[float, Field(gt=0, description="peak learning rate (cosine schedule)")] = 0.05
    lr_min_ratio: Annotated[float, Field(gt=0, le=1, description="the cosine ends at lr x this")] = 0.01
    val_fraction: Annotated[float, Field(gt=0, lt=1, description="teacher trajectories held out to keep the best "
                                                                 "grid seen")] = 0.1
    eval_every: Annotated[int, Field(ge=1, description="iterations between two checks on the held-out part")] = 25
    seed: Annotated[int, Field(ge=0, description="held-out split and batch order")] = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LD3Config(LD3Options):
    """An LD3 run: the options and the NFE of the grid."""

    nfe: Annotated[int, Field(ge=1, description="denoiser calls of the solver on the grid")] = 5

    def __post_init__(self):
        if self.solver not in LD3_SOLVERS:
            raise ValueError(f"ld3.solver must be one of {list(LD3_SOLVERS)}, got {self.solver!r}"
                             + (f": {self.solver} steps into σ = 0, but the teacher ends at σ_min"
                                if self.solver in BASELINES else ""))
        plan_for_nfe(self.solver, self.nfe)   # an NFE the solver cannot spend fails here


def final_state_loss(name: str, sigmas: torch.Tensor, denoiser, start: torch.Tensor, target: torch.Tensor,
                     cond, afs: bool = False) -> torch.Tensor:
    """mean |Ψ_sigmas(start) − target|²: the baseline ``name`` run over ``sigmas`` against the teacher's solution."""
    out = BASELINES[name](denoiser, start, sigmas, cond=cond, afs=afs)
    return ((out - target) ** 2).mean()


def learn_grid(teacher_dir: str | os.PathLike, out: str | os.PathLike, cfg: LD3Config,
               expect: dict[str, Any] | None = None, progress: bool = True) -> SolverGrid:
    """Fit ``cfg.solver``'s grid at ``cfg.nfe`` to the teacher's endpoints; write ``OUT.json`` (the grid),
    ``OUT.loss.csv`` and ``OUT.loss.png``. ``expect`` is checked against the teacher's config first."""
    out = grid_path(out).with_suffix("")
    manifest = load_manifest(teacher_dir)
    tcfg = TeacherConfig(**manifest["config"])
    data = load_teacher(teacher_dir, expect=expect)
    backbone = load_backbone(tcfg.backbone, **tcfg.backbone_options)
    plan = plan_for_nfe(cfg.solver, cfg.nfe)
    start = grid_for(plan, cfg.start_schedule or tcfg.schedule, tcfg.sigma_min, tcfg.sigma_max, tcfg.rho,
                     **tcfg.schedule_args)
    params = GridParams(start)
    opt = torch.optim.Adam(params.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    noise, target, cond_ids = data["states"][:, 0].double(), data["states"][:, -1].double(), data["cond_ids"]
    conds = tcfg.conditions()
    all_cond = None if conds is None else tcfg.encode(backbone, torch.arange(len(conds)))
    order = torch.randperm(len(noise), generator=gen)
    n_val = max(1, round(cfg.val_fraction * len(noise)))
    if n_val >= len(noise):
        raise ValueError(f"ld3: the teacher has {len(noise)} samples, too few to hold out {n_val} and train on the "
                         f"rest")
    val, train = order[:n_val], order[n_val:]

    def val_loss() -> float:
        with torch.no_grad():
            return final_state_loss(cfg.solver, params(), backbone, noise[val], target[val],
                                    select_rows(all_cond, cond_ids[val]), plan.afs).item()

    best = (val_loss(), 0, params().detach())
    start_val = best[0]
    losses: list[float] = []
    t0 = time.perf_counter()
    for it in tqdm(range(cfg.iterations), desc=f"ld3 {cfg.solver} nfe={cfg.nfe}", disable=not progress):
        idx = train[torch.randint(len(train), (cfg.batch,), generator=gen)]
        for group in opt.param_groups:
            group["lr"] = cosine_lr(cfg, it)
        loss = final_state_loss(cfg.solver, params(), backbone, noise[idx], target[idx],
                                select_rows(all_cond, cond_ids[idx]), plan.afs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iterations:
            v = val_loss()
            if v < best[0]:
                best = (v, it + 1, params().detach())
    sigmas = best[2]
    grid = SolverGrid(cfg.solver, tuple(sigmas.tolist()), plan.afs, backbone.name, tcfg.schedule,
                      None if conds is None else tuple(conds))
    save_grid(grid, out, provenance={"ld3": cfg.to_json(), "start_schedule": cfg.start_schedule or tcfg.schedule,
                                     "start_grid": start.tolist(), "teacher": str(teacher_dir),
                                     "teacher_config": manifest["config"],
                                     "teacher_config_hash": manifest["config_hash"], "final_loss": losses[-1],
                                     "val_loss": best[0], "start_val_loss": start_val, "best_iteration": best[1],
                                     "seconds": time.perf_counter() - t0})
    write_loss_curve(losses, out)
    return grid


__all__ = ["LD3Config", "LD3Options", "LD3_SOLVERS", "final_state_loss", "learn_grid"]
