"""Stage 2, RDPO: PPO with RLOO advantages on the residual Dirichlet policy of a distilled table.

One PPO step: draw ``rollout_batch_size`` tables from the policy (B/k prompts, k tables each), solve all B samples
in one batched ``sample_epd`` call with one table per sample, score them with the reward, take RLOO advantages
within each prompt's k samples, then ``ppo_epochs`` passes of clipped-PPO minibatch updates (AdamW, gradient-norm
clipping, optional KL to the cold-start prior and entropy bonus). The backbone is never trained.

All randomness of step t (prompts, noise seeds, table draws, minibatch order) comes from a generator seeded by
(seed, t), so a run resumed from its checkpoint (``STEM.ckpt.safetensors``: policy, optimiser, metrics, in one
atomically written file) is identical to an uninterrupted one. Training noise seeds are drawn from [10⁹, 2⁶²), so
they never meet evaluation seeds below 10⁹.

Under ``torchrun --nproc-per-node N`` the run is data-parallel and follows the trajectory of one process with the
same ``rollout_batch_size`` (up to float rounding): every rank draws the whole step from the step generator, solves
and scores its contiguous B/N samples, and gathers the rewards, so RLOO sees the whole batch. In the update each
rank takes its share of every minibatch, its loss scaled by the minibatch size so that the summed (all-reduced)
gradients are the minibatch gradient; the KL and entropy terms are added on rank 0 only, and gradients are clipped
after the sum. Rank 0 alone writes the checkpoint, table, metrics and tracking; the checkpoint does not record N,
so a run may resume on another number of processes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from tqdm import tqdm

from .. import distributed, tracking
from ..backbones import Backbone
from ..io import (atomic_write, code_version, load_optimizer, optimizer_tensors, safetensors_metadata, set_aside,
                  weight_paths)
from ..options import Field
from ..rewards import REWARDS, Reward
from ..solvers import SolverTable, load_table, sample_epd, save_table
from ..solvers.plan import check_table_use
from .policy import Action, DirichletPolicy, entropy, kl_divergence, log_prob, sample
from .ppo import GROUPINGS, ppo_loss, rloo_advantages

TRAIN_SEED_START = 10**9
METRICS = ("step", "reward_mean", "reward_std", "kl_prior", "clip_fraction", "approx_kl", "entropy", "policy_loss",
           "grad_norm")


@dataclass(frozen=True)
class RDPOConfig:
    """PPO on the table policy (config section ``rdpo.ppo``): upstream's ``ppo.*`` keys with their defaults, plus the
    few choices upstream hard-codes or lacks."""

    steps: Annotated[int, Field(ge=1, description="PPO steps")] = 100
    rollout_batch_size: Annotated[int, Field(ge=1, description="samples per PPO step: rollout_batch_size / rloo_k "
                                                               "prompts x rloo_k tables")] = 8
    rloo_k: Annotated[int, Field(ge=2, description="samples per prompt for the leave-one-out baseline")] = 4
    ppo_epochs: Annotated[int, Field(ge=1, description="passes over each rollout")] = 1
    minibatch_size: Annotated[int, Field(ge=1, description="samples per gradient step")] = 4
    learning_rate: Annotated[float, Field(gt=0, description="AdamW learning rate")] = 7e-5
    clip_range: Annotated[float, Field(gt=0, description="PPO ratio clip")] = 0.2
    kl_coef: Annotated[float, Field(ge=0, description="KL to the distilled (cold-start) policy")] = 0.0
    entropy_coef: Annotated[float, Field(ge=0, description="entropy bonus")] = 0.0
    max_grad_norm: Annotated[float, Field(ge=0, description="gradient-norm clip (0: none)")] = 1.0
    dirichlet_concentration: Annotated[float, Field(gt=0, description="c in the log-concentration log(c * mean) + "
                                                                      "delta: how far draws stray (upstream: 20 "
                                                                      "SD1.5, 10 SD3)")] = 20.0
    save_interval: Annotated[int, Field(ge=1, description="steps between checkpoint and table writes")] = 50
    seed: Annotated[int, Field(ge=0, description="policy initialisation, prompts, noise and draws of each step")] = 0
    rloo_grouping: Annotated[Literal[GROUPINGS], Field(description="RLOO groups: a prompt's k samples, or "
                                                                   "upstream's strided groups of k prompts")] = "prompt"
    shared_noise: Annotated[bool, Field(description="a prompt's k samples start from one noise, so the baseline "
                                                    "compares tables, not noise draws")] = True
    normalize_advantages: Annotated[bool, Field(description="standardise advantages per batch (upstream)")] = True
    scales: Annotated[bool, Field(description="also learn scale_dir / scale_time (log-normal); else keep the "
                                              "table's")] = False
    scale_std: Annotated[float, Field(gt=0, description="std of the log-scales (upstream ppo.scale_std)")] = 0.05
    hidden_dim: Annotated[int, Field(ge=1, description="width of the residual MLP")] = 256
    num_layers: Annotated[int, Field(ge=1, description="depth of the residual MLP")] = 3
    weight_decay: Annotated[float, Field(ge=0, description="AdamW weight decay (upstream: 0)")] = 0.0

    def __post_init__(self):
        if self.rollout_batch_size % self.rloo_k:
            raise ValueError(f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of rloo_k "
                             f"({self.rloo_k}): RLOO needs k samples per prompt")
        if self.minibatch_size > self.rollout_batch_size:
            raise ValueError(f"minibatch_size ({self.minibatch_size}) exceeds rollout_batch_size "
                             f"({self.rollout_batch_size})")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check_world_size(self, n: int) -> None:
        """Refuse a rollout batch that ``n`` processes cannot share equally (each solves B / n samples)."""
        b = self.rollout_batch_size
        if b % n:
            raise ValueError(f"rollout_batch_size {b} does not split over {n} processes ({b} % {n} = {b % n}); "
                             f"use a multiple of {math.lcm(n, self.rloo_k)} (of both the {n} processes and "
                             f"rloo_k {self.rloo_k})")


@dataclass(frozen=True)
class RDPOOptions:
    """Stage 2 (config section ``rdpo``): the reward, the training prompts, PPO, and an optional held-out check."""

    reward: Annotated[dict[Literal[tuple(REWARDS)], float],
                      Field(min_length=1, description="reward name -> weight, as upstream reward.multi.weights")] = \
        field(default_factory=lambda: {"label_logprob": 1.0, "realism": 0.5})
    prompts: Annotated[str, Field(min_length=1, description="training prompts (.txt, or .csv with a text column)",
                                  json_schema_extra={"flag": "--prompt-file"})] = "data/prompts/digits.txt"
    eval_samples: Annotated[int, Field(ge=0, description="after training, compare start and tuned table on this "
                                                         "many held-out seeds (0: skip)")] = 0
    processes: Annotated[int, Field(ge=1, description="processes sharing each rollout (torchrun on one node, one GPU "
                                                      "each: the pipeline asks SLURM for that many GPUs); the same "
                                                      "tables as one process")] = 1
    ppo: RDPOConfig = field(default_factory=RDPOConfig)

    def __post_init__(self):
        self.ppo.check_world_size(self.processes)


@dataclass
class Rollout:
    action: Action
    old_log_prob: torch.Tensor   # [B]
    rewards: torch.Tensor        # [B] float64
    prompts: list[str]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of PPO step ``step``: a function of (seed, step) alone, so resuming needs no RNG state."""
    digest = hashlib.sha256(f"rdpo:{seed}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def rollout(policy: DirichletPolicy, backbone: Backbone, reward: Reward, prompts: list[str], cfg: RDPOConfig,
            gen: torch.Generator) -> Rollout:
    """B tables from the policy, one batched EPD solve with a table per sample, and their rewards.

    Every rank draws the whole batch; under torchrun each solves and scores its contiguous B / N samples and the
    rewards are gathered, so every rank returns the whole rollout."""
    k, groups = cfg.rloo_k, cfg.rollout_batch_size // cfg.rloo_k
    picked = [prompts[i] for i in torch.randint(len(prompts), (groups,), generator=gen).tolist()]
    batch_prompts = [p for p in picked for _ in range(k)]                       # prompt-major
    seeds = torch.randint(TRAIN_SEED_START, 2**62, (groups if cfg.shared_noise else groups * k,), generator=gen)
    if cfg.shared_noise:
        seeds = seeds.repeat_interleave(k)
    draw_seed = int(torch.randint(2**62, (1,), generator=gen))
    with torch.no_grad():
        params = policy()
        action = sample(params, len(batch_prompts), draw_seed)
        old = log_prob(params, action)
        n, r = distributed.world_size(), distributed.rank()
        mine = slice(r * len(action) // n, (r + 1) * len(action) // n)
        x = sample_epd(backbone, backbone.noise(seeds[mine].tolist()), policy.meta.sigmas(),
                       policy.tables(action.select(mine)), cond=backbone.encode(prompts=batch_prompts[mine]))
        rewards = distributed.all_gather(reward.score(backbone.to_pixels(x), batch_prompts[mine]).double().cpu())
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError(f"the reward returned non-finite values for prompts {batch_prompts}")
    return Rollout(action, old, rewards, batch_prompts)


def ppo_update(policy: DirichletPolicy, opt: torch.optim.Optimizer, roll: Rollout, cfg: RDPOConfig,
               gen: torch.Generator) -> dict[str, float]:
    """``ppo_epochs`` passes of minibatch clipped-PPO updates on one rollout; returns the mean statistics.

    Under torchrun each rank takes its share of every minibatch (shares may be uneven, or empty) and the gradients
    and loss statistics are summed over the ranks before clipping and the optimiser step (module docstring)."""
    adv = rloo_advantages(roll.rewards, cfg.rloo_k, grouping=cfg.rloo_grouping,
                          normalize=cfg.normalize_advantages).to(roll.old_log_prob)
    prior = policy.prior()
    weights = list(policy.parameters())
    ranks, main = distributed.world_size(), distributed.is_main()
    sums = {"policy_loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0, "grad_norm": 0.0}
    n = 0
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(len(adv), generator=gen)
        for start in range(0, len(adv), cfg.minibatch_size):
            idx = order[start:start + cfg.minibatch_size]
            mine = idx.tensor_split(ranks)[distributed.rank()]
            params = policy()
            loss, stats = ppo_loss(log_prob(params, roll.action.select(mine)), roll.old_log_prob[mine], adv[mine],
                                   cfg.clip_range, denominator=len(idx))
            total = loss
            if cfg.kl_coef and main:      # terms of the whole minibatch: counted once
                total = total + cfg.kl_coef * kl_divergence(params, prior)
            if cfg.entropy_coef and main:
                total = total - cfg.entropy_coef * entropy(params)
            opt.zero_grad()
            total.backward()
            if ranks > 1:
                grads = [torch.zeros_like(w) if w.grad is None else w.grad for w in weights]   # policy: float64
                local = torch.tensor([loss.item(), stats["clip_fraction"], stats["approx_kl"]], dtype=torch.float64)
                *grads, summed = distributed.all_reduce_sum([*grads, local])
                for w, g in zip(weights, grads):
                    w.grad = g
                loss_value, stats = summed[0].item(), {"clip_fraction": summed[1].item(),
                                                       "approx_kl": summed[2].item()}
            else:
                loss_value = loss.item()
            norm = torch.nn.utils.clip_grad_norm_(weights, cfg.max_grad_norm or math.inf)
            opt.step()
            for key, value in (("policy_loss", loss_value), ("grad_norm", norm.item()), *stats.items()):
                sums[key] += value
            n += 1
    return {key: v / n for key, v in sums.items()}


def ckpt_path(out: Path) -> Path:
    return out.with_name(out.name + ".ckpt.safetensors")


def _save_checkpoint(out: Path, policy: DirichletPolicy, opt: torch.optim.Optimizer, step: int,
                     rows: list[list[float]], run_hash: str) -> None:
    """Policy, optimiser and metrics in one safetensors file (the JSON header in its metadata): one atomic write."""
    tensors = {f"policy.{k}": v.detach().clone() for k, v in policy.state_dict().items()}
    opt_tensors, param_groups = optimizer_tensors(opt)
    tensors.update(opt_tensors)
    tensors["metrics"] = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(METRICS))
    header = {"step": step, "run_hash": run_hash, "param_groups": param_groups}
    atomic_write(ckpt_path(out), st_save(tensors, metadata={"rdpo": json.dumps(header)}))


def _load_checkpoint(out: Path, policy: DirichletPolicy, opt: torch.optim.Optimizer, run_hash: str,
                     steps: int) -> tuple[int, list[list[float]]]:
    """Restore a checkpoint of this run (same config, start table and code; at most ``steps`` steps in); (0, []) if
    there is none. A checkpoint of anything else is kept under another name and the run starts over, so a lower
    ``steps`` gives the table of that many steps. Rank 0 reads the file and sends its bytes to the other ranks, so
    every rank starts from the same state."""
    path = ckpt_path(out)
    main = distributed.is_main()
    blob = distributed.broadcast_bytes((path.read_bytes() if path.exists() else b"") if main else None)
    if not blob:
        return 0, []
    header = json.loads(safetensors_metadata(blob).get("rdpo", "{}"))
    other = header.get("run_hash") != run_hash
    if other or header.get("step", 0) > steps:
        why = ("another config, start table or code version" if other else
               f"a longer run (step {header.get('step')}, steps={steps} now)")
        if main:
            kept = set_aside(path, f"ckpt-{str(header.get('run_hash'))[:8]}-step{header.get('step')}")
            print(f"rdpo: {path} belongs to {why}; kept as {kept.name}, starting over")
        distributed.barrier()
        return 0, []
    tensors = st_load(blob)
    policy.load_state_dict({k.removeprefix("policy."): v for k, v in tensors.items() if k.startswith("policy.")})
    load_optimizer(opt, tensors, header["param_groups"])
    return header["step"], tensors["metrics"].tolist()


def run_hash(cfg: RDPOConfig, start: Path, backbone: Backbone, reward: Reward, prompts: list[str],
             backbone_options: dict[str, Any]) -> str:
    """What fixes the trajectory of a run: config (but not its length or save cadence), start table, backbone,
    reward, prompts and the code. ``--steps`` can therefore grow on a rerun and the run continues where it stopped."""
    key = {k: v for k, v in cfg.to_json().items() if k not in ("steps", "save_interval")}
    table_sha = json.loads(weight_paths(start)[1].read_text()).get("tensors_sha256")
    blob = json.dumps([key, table_sha, backbone.name, backbone_options, getattr(reward, "weights", reward.name),
                       prompts, code_version()], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def rdpo(start_table: str | Path, out: str | Path, cfg: RDPOConfig, *, backbone: Backbone, reward: Reward,
         prompts: list[str], backbone_options: dict[str, Any] | None = None, progress: bool = True,
         stop_after: int | None = None) -> SolverTable | None:
    """Fine-tune the table at ``start_table``; writes ``OUT.json/.safetensors`` (the policy mean, at every save and
    at the end), ``OUT.metrics.csv``, ``OUT.metrics.png`` and ``OUT.ckpt.safetensors`` (kept, so a rerun with more
    ``steps`` continues). ``stop_after`` ends the run after that many steps, as an interruption would (returns None).

    Under torchrun (see the module docstring) every rank calls this with the same arguments and gets the same
    table; the process group is joined if it is not yet (:func:`epd.distributed.init`), and the rollout batch must
    split evenly over the processes (:meth:`RDPOConfig.check_world_size`). Returns once the outputs are written.
    """
    distributed.init()
    cfg.check_world_size(distributed.world_size())
    return _rdpo(Path(start_table), Path(out), cfg, backbone=backbone, reward=reward, prompts=prompts,
                 backbone_options=backbone_options, progress=progress, stop_after=stop_after)


def _rdpo(start_table: Path, out: Path, cfg: RDPOConfig, *, backbone: Backbone, reward: Reward, prompts: list[str],
          backbone_options: dict[str, Any] | None, progress: bool, stop_after: int | None) -> SolverTable | None:
    start = load_table(start_table)
    check_table_use(start, backbone=backbone.name, sigma_max=backbone.sigma_max, source=str(start_table))
    if not prompts:
        raise ValueError("rdpo needs at least one training prompt")
    backbone.encode(prompts=list(prompts))  # refuses bad prompts (e.g. naming two digits) before anything is written
    torch.manual_seed(cfg.seed)  # the MLP's initial weights (its zero output layer makes them irrelevant at step 0)
    policy = DirichletPolicy(start, cfg.dirichlet_concentration, scales=cfg.scales, scale_std=cfg.scale_std,
                             hidden_dim=cfg.hidden_dim, num_layers=cfg.num_layers)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    key = run_hash(cfg, start_table, backbone, reward, list(prompts), backbone_options or {})
    step, rows = _load_checkpoint(out, policy, opt, key, cfg.steps)
    main = distributed.is_main()   # the one process that writes files and tracks
    if main and step:
        done = "finished: exporting its table, nothing to train" if step == cfg.steps else "resuming"
        print(f"rdpo: {ckpt_path(out)} is this run's checkpoint at step {step} of {cfg.steps}; {done}")
        tracking.set_tags({"resumed_from_step": step})
    if main:
        out.parent.mkdir(parents=True, exist_ok=True)
        tracking.log_params({"rdpo": {**cfg.to_json(), "start_table": str(start_table),
                                      "num_prompts": len(prompts)}})
    provenance = {"rdpo": cfg.to_json(), "start_table": str(start_table), "backbone_options": backbone_options or {},
                  "reward": getattr(reward, "weights", reward.name), "num_prompts": len(prompts)}
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, desc="rdpo", disable=not (progress and main))
    ran, logged = step < cfg.steps, 0   # a resumed run logs the checkpoint's curves too: its history is whole
    while step < cfg.steps:
        gen = step_generator(cfg.seed, step)
        roll = rollout(policy, backbone, reward, list(prompts), cfg, gen)
        stats = ppo_update(policy, opt, roll, cfg, gen)
        with torch.no_grad():
            params = policy()
            stats.update(kl_prior=float(kl_divergence(params, policy.prior())), entropy=float(entropy(params)))
        stats.update(reward_mean=float(roll.rewards.mean()), reward_std=float(roll.rewards.std(unbiased=False)))
        step += 1
        rows.append([float(step), *(stats[m] for m in METRICS[1:])])
        bar.update(1)
        bar.set_postfix(reward=f"{stats['reward_mean']:.3f}", kl=f"{stats['kl_prior']:.2e}")
        if main and (step % cfg.save_interval == 0 or step == cfg.steps):
            _save_checkpoint(out, policy, opt, step, rows, key)
            _export(policy, out, rows, {**provenance, "step": step, "seconds": time.perf_counter() - t0})
            for i, name in enumerate(METRICS[1:], 1):  # MLflow gets the curves in batches, at each save
                tracking.log_metric_history(name, [r[i] for r in rows[logged:]], [int(r[0]) for r in rows[logged:]])
            logged = len(rows)
        if stop_after is not None and step >= stop_after and step < cfg.steps:
            bar.close()
            distributed.barrier()
            return None
    bar.close()
    if main:
        if not ran:  # a rerun of a finished run: export again (cheap), in case the outputs were removed
            _export(policy, out, rows, {**provenance, "step": step})
        for path in (out.with_name(out.name + ".json"), out.with_name(out.name + ".metrics.csv"),
                     out.with_name(out.name + ".metrics.png")):
            tracking.log_artifact(path)
    distributed.barrier()   # no rank returns before the outputs exist
    return policy.mean_table()


def _export(policy: DirichletPolicy, out: Path, rows: list[list[float]], provenance: dict[str, Any]) -> None:
    save_table(policy.mean_table(), out, provenance=provenance)
    write_metrics(rows, out)


def write_metrics(rows: list[list[float]], out: Path) -> None:
    """``OUT.metrics.csv`` (one row per PPO step) and ``OUT.metrics.png`` (reward, KL to the prior, clipping)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [",".join(METRICS)] + [",".join([str(int(r[0]))] + [f"{v:.9g}" for v in r[1:]]) for r in rows]
    atomic_write(out.with_name(out.name + ".metrics.csv"), ("\n".join(lines) + "\n").encode())
    cols = dict(zip(METRICS, zip(*rows))) if rows else {m: () for m in METRICS}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    steps, mean, std = cols["step"], torch.tensor(cols["reward_mean"]), torch.tensor(cols["reward_std"])
    axes[0].plot(steps, mean, lw=0.8, label="batch mean")
    if len(mean) >= 5:
        w = max(1, len(mean) // 20)
        smooth = torch.nn.functional.avg_pool1d(mean[None, None], w, 1, padding=0)[0, 0]
        axes[0].plot(steps[w - 1:], smooth, lw=2, label=f"mean over {w} steps")
    axes[0].fill_between(steps, mean - std, mean + std, alpha=0.2, label="± batch std")
    axes[0].set_ylabel("reward")
    axes[0].legend(fontsize=7)
    axes[1].plot(steps, cols["kl_prior"])
    axes[1].set_ylabel("KL(policy ‖ cold-start prior)")
    axes[2].plot(steps, cols["clip_fraction"], label="clip fraction")
    axes[2].plot(steps, cols["approx_kl"], label="approx. KL(old ‖ new)")
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("PPO step")
    fig.suptitle(out.name)
    fig.tight_layout()
    png = out.with_name(out.name + ".metrics.png")
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png)


__all__ = ["METRICS", "RDPOConfig", "Rollout", "TRAIN_SEED_START", "ppo_update", "rdpo", "rollout",
           "step_generator", "write_metrics"]
