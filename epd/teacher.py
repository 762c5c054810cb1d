"""Teacher trajectories: an accurate solver's states at the student's grid points, streamed to safetensors shards.

The teacher (DPM-Solver-2 or Heun) takes ``inserted_steps`` M extra steps inside every student interval, spaced
uniformly in log σ, and records the state each time it reaches a student grid point. A directory holds
``shard-00000.safetensors …`` (``states`` [n, N, C, H, W], ``seeds`` [n], ``labels`` [n], ``cond_ids`` [n]: the
index of each sample's label or prompt in the config, −1 if unconditional) and ``manifest.json``
(the resolved config, its hash, the grid, the shards with their SHA-256). Memory stays bounded by one shard.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from tqdm import tqdm

from . import schedules
from .backbones import Backbone, load_backbone
from .data import parse_labels, parse_seeds, read_prompts, seed_count
from .io import read_json_header, replace_dir, sha256
from .options import Field
from .solvers import TEACHERS

FORMAT = "epd-teacher"
SEEDS = r"^\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*$"   # what parse_seeds reads (it checks the rest)


@dataclass(frozen=True)
class TeacherOptions:
    """The teacher trajectories (config section ``teacher``): an accurate solver with M steps inserted in each
    student interval, from training seeds kept apart from every evaluation seed."""

    solver: Annotated[Literal[tuple(TEACHERS)], Field(description="accurate solver of the trajectories")] = "dpm2"
    inserted_steps: Annotated[int, Field(ge=0, description="M teacher steps inserted in each student interval")] = 31
    seeds: Annotated[str, Field(pattern=SEEDS, description="training seeds, e.g. 100000-101999 (keep them apart "
                                                          "from the sampling seeds)")] = "100000-101999"
    labels: Annotated[str | None, Field(pattern=r"^\d(,\d)*$", description="class labels cycled over the seeds, "
                                        "e.g. 0,1,2 (condition the teacher as the samples are; none: unconditional)")] = None
    prompts: Annotated[str | None, Field(min_length=1, description="prompt file cycled over the seeds (text-to-image; "
                                         ".txt or .csv with a text column)", json_schema_extra={"flag": "--prompt-file"})] = None
    batch: Annotated[int, Field(ge=1, description="trajectories per batch")] = 500
    shard_size: Annotated[int, Field(ge=1, description="trajectories per safetensors shard")] = 1000

    def __post_init__(self):
        if self.labels is not None and self.prompts is not None:
            raise ValueError("give labels or prompts, not both")
        seed_count(self.seeds)
        if self.labels is not None:
            parse_labels(self.labels)


class TeacherError(ValueError):
    """A teacher directory is missing, corrupt, or made for another backbone, grid or config."""


@dataclass(frozen=True)
class TeacherConfig:
    """Everything that determines a teacher directory (recorded in its manifest, hashed): the options resolved
    against a backbone, a grid and the conditions."""

    backbone: str = "gmm-digits"
    backbone_options: dict[str, Any] = field(default_factory=dict)
    schedule: str = "polynomial"      # the student grid
    num_steps: int = 4
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    solver: str = TeacherOptions.solver
    inserted_steps: int = TeacherOptions.inserted_steps
    seeds: str = TeacherOptions.seeds  # training seeds; evaluation seeds stay below 100000
    labels: list[int] | None = None    # cycled over the seeds; None = unconditional
    prompts: list[str] | None = None   # or text prompts cycled over the seeds (text-to-image backbones)
    schedule_args: dict[str, Any] = field(default_factory=dict)   # e.g. SD3's flow-match shift, from the backbone
    batch_size: int = TeacherOptions.batch
    shard_size: int = TeacherOptions.shard_size

    def __post_init__(self):
        if self.solver not in TEACHERS:
            raise ValueError(f"teacher.solver must be one of {sorted(TEACHERS)}, got {self.solver!r}")
        if self.inserted_steps < 0:
            raise ValueError(f"teacher.inserted_steps must be >= 0, got {self.inserted_steps}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError("teacher.batch_size and teacher.shard_size must be >= 1")
        if self.labels is not None and self.prompts is not None:
            raise ValueError("give labels or prompts, not both")
        if (self.labels is not None and not self.labels) or (self.prompts is not None and not self.prompts):
            raise ValueError("teacher: the label/prompt list is empty")

    @classmethod
    def resolve(cls, options: TeacherOptions, backbone: Backbone, backbone_options: dict[str, Any], schedule: str,
                num_steps: int, rho: float = 7.0) -> "TeacherConfig":
        """The teacher of ``options`` on ``backbone`` for a student grid of ``num_steps`` points of ``schedule``
        (σ range and schedule arguments from the backbone)."""
        grid = backbone.grid_args(schedule)
        return cls(backbone=backbone.name, backbone_options=backbone_options, schedule=schedule, num_steps=num_steps,
                   sigma_min=grid["sigma_min"], sigma_max=grid["sigma_max"], rho=rho,
                   schedule_args=grid["schedule_args"], solver=options.solver,
                   inserted_steps=options.inserted_steps, seeds=options.seeds,
                   labels=parse_labels(options.labels) if options.labels is not None else None,
                   prompts=read_prompts(options.prompts) if options.prompts is not None else None,
                   batch_size=options.batch, shard_size=options.shard_size)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def hash(self) -> str:
        """Hash of everything that determines the states (batch and shard sizes do not)."""
        key = {k: v for k, v in self.to_json().items() if k not in ("batch_size", "shard_size")}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def student_sigmas(self) -> torch.Tensor:
        return schedules.get_sigmas(self.schedule, self.num_steps, self.sigma_min, self.sigma_max, self.rho,
                                    **self.schedule_args)

    def conditions(self) -> list[int] | list[str] | None:
        """What is cycled over the seeds: labels, prompts or nothing."""
        return self.labels if self.labels is not None else self.prompts

    def encode(self, backbone: Backbone, ids: torch.Tensor) -> Any:
        """The backbone's conditioning for samples whose condition indices are ``ids`` (None if unconditional)."""
        conds = self.conditions()
        if conds is None:
            return None
        picked = [conds[int(i)] for i in ids]
        return backbone.encode(labels=picked) if self.labels is not None else backbone.encode(prompts=picked)


def teacher_grid(student: torch.Tensor, inserted_steps: int) -> tuple[torch.Tensor, list[int]]:
    """The fine grid (M points inserted log-uniformly in each interval) and where the student points sit in it."""
    pieces, where = [student[:1]], [0]
    for s, s_next in zip(student[:-1], student[1:]):
        sub = torch.linspace(math.log(s), math.log(s_next), inserted_steps + 2, dtype=torch.float64).exp()[1:]
        sub[-1] = s_next  # keep the student points exact
        pieces.append(sub)
        where.append(where[-1] + inserted_steps + 1)
    return torch.cat(pieces), where


def run_teacher(backbone: Backbone, cfg: TeacherConfig, x: torch.Tensor, cond) -> torch.Tensor:
    """States [B, N, ...] at the student grid points, starting from x at σ_max (included as state 0)."""
    fine, where = teacher_grid(cfg.student_sigmas(), cfg.inserted_steps)
    states = [x]
    keep = set(where[1:])

    def record(info):
        if info["i"] + 1 in keep:
            states.append(info["x"])

    with torch.no_grad():
        TEACHERS[cfg.solver](backbone, x, fine, cond=cond, callback=record)
    return torch.stack(states, dim=1)


def write_teacher(cfg: TeacherConfig, out: str | os.PathLike, progress: bool = True,
                  backbone: Backbone | None = None) -> bool:
    """Write the teacher directory; returns False (and writes nothing) if it is already there for this config.
    ``backbone``: the one ``cfg`` names, if the caller has it loaded already."""
    out = Path(out)
    if _up_to_date(out, cfg):
        return False
    backbone = backbone or load_backbone(cfg.backbone, **cfg.backbone_options)
    seeds = parse_seeds(cfg.seeds)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards, buffer = [], {"states": [], "seeds": [], "labels": [], "cond_ids": []}

    def flush():
        if not buffer["seeds"]:
            return
        blob = st_save({k: torch.cat(v).contiguous() for k, v in buffer.items()})
        name = f"shard-{len(shards):05d}.safetensors"
        (tmp / name).write_bytes(blob)
        shards.append({"file": name, "count": sum(len(s) for s in buffer["seeds"]), "sha256": sha256(blob)})
        for v in buffer.values():
            v.clear()

    try:
        for start in tqdm(range(0, len(seeds), cfg.batch_size), desc="teacher", unit="batch", disable=not progress):
            batch = seeds[start:start + cfg.batch_size]
            conds = cfg.conditions()
            ids = (torch.full((len(batch),), -1, dtype=torch.long) if conds is None else
                   torch.arange(start, start + len(batch)) % len(conds))
            labels = torch.tensor([cfg.labels[i] for i in ids]) if cfg.labels is not None else torch.full_like(ids, -1)
            states = run_teacher(backbone, cfg, backbone.noise(batch), cfg.encode(backbone, ids))
            buffer["states"].append(states.float())
            buffer["seeds"].append(torch.tensor(batch, dtype=torch.long))
            buffer["labels"].append(labels)
            buffer["cond_ids"].append(ids)
            if sum(len(s) for s in buffer["seeds"]) >= cfg.shard_size:
                flush()
        flush()
        manifest = {
            "format": FORMAT, "config": cfg.to_json(), "config_hash": cfg.hash, "backbone": backbone.name,
            "sigmas": cfg.student_sigmas().tolist(), "num_samples": len(seeds), "shards": shards,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def _up_to_date(out: Path, cfg: TeacherConfig) -> bool:
    try:
        load_manifest(out, expect_hash=cfg.hash)
        return True
    except TeacherError:
        return False


def load_manifest(path: str | os.PathLike, expect_hash: str | None = None) -> dict[str, Any]:
    """Read and check a teacher directory's manifest and shard checksums (not the tensors themselves)."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise TeacherError(f"teacher missing: {manifest_path} does not exist (run `epd teacher` first)")
    manifest = read_json_header(manifest_path, FORMAT, TeacherError, "an epd teacher manifest")
    if expect_hash is not None and manifest.get("config_hash") != expect_hash:
        raise TeacherError(f"{path} was made for another teacher config (hash {manifest.get('config_hash')})")
    for shard in manifest.get("shards", []):
        f = path / shard["file"]
        if not f.exists():
            raise TeacherError(f"teacher shard missing: {f}")
        if sha256(f.read_bytes()) != shard["sha256"]:
            raise TeacherError(f"teacher shard corrupt: {f} does not match its checksum in manifest.json")
    return manifest


def load_teacher(path: str | os.PathLike, expect: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """All states, seeds and labels of a teacher directory, after checking it fits ``expect``.

    ``expect`` holds config values the caller relies on, e.g. ``{"backbone": "gmm-digits", "num_steps": 4,
    "schedule": "logsnr"}``; each difference is named in the error.
    """
    manifest = load_manifest(path)
    config = manifest["config"]
    wrong = [f"{k}: teacher has {config.get(k)!r}, expected {v!r}" for k, v in (expect or {}).items()
             if config.get(k) != v]
    if wrong:
        raise TeacherError(f"teacher {path} does not match: " + "; ".join(wrong))
    parts: dict[str, list[torch.Tensor]] = {"states": [], "seeds": [], "labels": [], "cond_ids": []}
    for shard in manifest["shards"]:
        tensors = st_load((Path(path) / shard["file"]).read_bytes())
        missing = sorted(set(parts) - set(tensors))
        if missing:
            raise TeacherError(f"teacher shard {Path(path) / shard['file']} lacks {missing} (written by an older epd?);"
                               f" rerun `epd teacher`")
        for k in parts:
            parts[k].append(tensors[k])
    data = {k: torch.cat(v) for k, v in parts.items()}
    if data["states"].shape[1] != config["num_steps"]:
        raise TeacherError(f"teacher {path}: states hold {data['states'].shape[1]} grid points, "
                           f"config says num_steps={config['num_steps']}")
    return data
