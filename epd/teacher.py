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
from .io import atomic_write, link_or_copy, read_json_header, replace_dir, sha256
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
    shard_size: Annotated[int | None, Field(ge=1, description="trajectories per shard: one safetensors file, and in "
                                                             "the pipeline one job each (a multiple of batch; none: "
                                                             "one shard)")] = None

    def __post_init__(self):
        if self.labels is not None and self.prompts is not None:
            raise ValueError("give labels or prompts, not both")
        seed_count(self.seeds)
        if self.shard_size is not None and self.shard_size % self.batch:
            raise ValueError(f"shard_size ({self.shard_size}) must be a multiple of batch ({self.batch}), so that a "
                             f"sharded teacher solves the same batches as an unsharded one")
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
    shard_size: int | None = TeacherOptions.shard_size

    def __post_init__(self):
        if self.solver not in TEACHERS:
            raise ValueError(f"teacher.solver must be one of {sorted(TEACHERS)}, got {self.solver!r}")
        if self.inserted_steps < 0:
            raise ValueError(f"teacher.inserted_steps must be >= 0, got {self.inserted_steps}")
        if self.batch_size < 1 or (self.shard_size is not None and self.shard_size < 1):
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


def shard_ranges(cfg: TeacherConfig) -> list[range]:
    """The positions (in the seed list) of each shard: ``shard_size`` seeds each (one shard when it is None)."""
    n = seed_count(cfg.seeds)
    size = cfg.shard_size or n
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def _manifest(cfg: TeacherConfig, shards: list[dict], part: dict | None = None) -> dict[str, Any]:
    manifest = {"format": FORMAT, "config": cfg.to_json(), "config_hash": cfg.hash, "backbone": cfg.backbone,
                "sigmas": cfg.student_sigmas().tolist(), "num_samples": sum(s["count"] for s in shards),
                "shards": shards}
    if part is not None:
        manifest["part"] = part
    return manifest


def _write_shard(cfg: TeacherConfig, backbone: Backbone, index: int, positions: range, folder: Path,
                 progress: bool) -> dict[str, Any]:
    """Solve the seeds at ``positions`` of the seed list (batches aligned with the whole list's) into
    ``folder/shard-INDEX.safetensors``; returns its manifest entry."""
    seeds = parse_seeds(cfg.seeds)
    conds = cfg.conditions()
    parts: dict[str, list[torch.Tensor]] = {"states": [], "seeds": [], "labels": [], "cond_ids": []}
    starts = range(positions.start, positions.stop, cfg.batch_size)
    for start in tqdm(starts, desc=f"teacher shard {index}", unit="batch", disable=not progress):
        stop = min(start + cfg.batch_size, positions.stop)
        batch = seeds[start:stop]
        ids = (torch.full((len(batch),), -1, dtype=torch.long) if conds is None else
               torch.arange(start, stop) % len(conds))
        labels = torch.tensor([cfg.labels[i] for i in ids]) if cfg.labels is not None else torch.full_like(ids, -1)
        parts["states"].append(run_teacher(backbone, cfg, backbone.noise(batch), cfg.encode(backbone, ids)).float())
        parts["seeds"].append(torch.tensor(batch, dtype=torch.long))
        parts["labels"].append(labels)
        parts["cond_ids"].append(ids)
    blob = st_save({k: torch.cat(v).contiguous() for k, v in parts.items()})
    name = f"shard-{index:05d}.safetensors"
    (folder / name).write_bytes(blob)
    return {"file": name, "count": len(positions), "sha256": sha256(blob)}


def write_teacher(cfg: TeacherConfig, out: str | os.PathLike, progress: bool = True,
                  backbone: Backbone | None = None, shard: int | None = None) -> bool:
    """Write the teacher folder; returns False (and writes nothing) if it is already there for this config.

    ``shard``: write only that shard (``cfg.shard_size`` seeds; one job of a sharded teacher) as a folder of its own,
    for :func:`gather_teacher`. ``backbone``: the one ``cfg`` names, if the caller has it loaded already. The folder
    is filled under a temporary name and moved into place when complete."""
    out = Path(out)
    ranges = shard_ranges(cfg)
    if shard is not None and not 0 <= shard < len(ranges):
        raise ValueError(f"teacher shard {shard} does not exist: {seed_count(cfg.seeds)} seeds in shards of "
                         f"{cfg.shard_size} make {len(ranges)} (0-{len(ranges) - 1})")
    indices = range(len(ranges)) if shard is None else [shard]
    part = None if shard is None else {"index": shard, "of": len(ranges)}
    if _up_to_date(out, cfg, part):
        return False
    backbone = backbone or load_backbone(cfg.backbone, **cfg.backbone_options)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shards = [_write_shard(cfg, backbone, i, ranges[i], tmp, progress) for i in indices]
        atomic_write(tmp / "manifest.json", (json.dumps(_manifest(cfg, shards, part), indent=2) + "\n").encode())
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def gather_teacher(shards: str | os.PathLike, out: str | os.PathLike, expect: dict[str, Any] | None = None) -> Path:
    """The teacher folder from the shard folders ``shards/0``, ``shards/1``, … that :func:`write_teacher` wrote one
    job each. Every shard must be there and complete (its checksum), all of one config (which must fit ``expect``,
    as :func:`load_teacher` checks) and of the expected seeds; the folder is then the same bytes as an unsharded run
    (shard files hard-linked, not copied, where the file system allows). No model is loaded."""
    shards, out = Path(shards), Path(out)
    first = shards / "0"
    try:
        cfg = TeacherConfig(**load_manifest(first)["config"])
    except (TeacherError, TypeError) as e:
        raise TeacherError(f"teacher shard 0 is not usable: {e}") from None
    wrong = [f"{k}: the shards have {getattr(cfg, k)!r}, the config {v!r}" for k, v in (expect or {}).items()
             if getattr(cfg, k) != v]
    if wrong:
        raise TeacherError(f"the shards in {shards} were made for another config: " + "; ".join(wrong))
    ranges = shard_ranges(cfg)
    entries, files = [], []
    for i, positions in enumerate(ranges):
        folder = shards / str(i)
        try:
            manifest = load_manifest(folder, expect_hash=cfg.hash)
        except TeacherError as e:
            raise TeacherError(f"teacher shard {i} of {len(ranges)} is not usable: {e}") from None
        (entry,) = manifest["shards"]
        if manifest.get("part") != {"index": i, "of": len(ranges)} or entry["count"] != len(positions):
            raise TeacherError(f"{folder} is not shard {i} of {len(ranges)} with {len(positions)} trajectories "
                               f"(it says {manifest.get('part')}, {entry['count']})")
        entries.append(entry)
        files.append(folder / entry["file"])
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for f in files:
            link_or_copy(f, tmp / f.name)
        atomic_write(tmp / "manifest.json", (json.dumps(_manifest(cfg, entries), indent=2) + "\n").encode())
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _up_to_date(out: Path, cfg: TeacherConfig, part: dict | None = None) -> bool:
    try:
        manifest = load_manifest(out, expect_hash=cfg.hash)
    except TeacherError:
        return False
    return manifest.get("part") == part and manifest["config"] == cfg.to_json()


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
