"""``epd teacher``: an accurate solver's states at the student's grid points (safetensors shards + manifest)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import tracking
from ..config import STAGE_SECTIONS, Config
from ..data import parse_labels, read_prompts, seed_count
from ..solvers.plan import plan_for_nfe
from ..teacher import TeacherConfig, gather_teacher, write_teacher
from . import common

HELP = "write an accurate solver's states at the student grid (safetensors shards)"
SECTIONS = STAGE_SECTIONS["teacher"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (manifest.json + shard-*.safetensors)")
    grid = p.add_mutually_exclusive_group(required=True)
    grid.add_argument("--nfe", type=int, help="the student's NFE: fixes the grid length as EPD spends it")
    grid.add_argument("--num-steps", type=int, help="student grid points (instead of --nfe)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--shard", type=int, metavar="I",
                       help="write only shard I (teacher.shard_size seeds; one job of a sharded teacher)")
    split.add_argument("--gather", metavar="DIR",
                       help="make the teacher folder from the shard folders DIR/0, DIR/1, … (checked complete)")
    common.add_config(p, SECTIONS)


def run(args: argparse.Namespace, cfg: Config) -> int:
    num_steps = args.num_steps or plan_for_nfe("epd", args.nfe).num_steps
    if num_steps < 2:
        raise ValueError(f"--num-steps must be >= 2, got {num_steps}")
    out = common.check_writable_dir(args.out, "teacher folder")
    t = cfg.teacher
    if args.gather:   # no model needed: the shards say what they hold, checked against the config
        expect = {"backbone": cfg.backbone.name, "schedule": cfg.schedule.name, "num_steps": num_steps,
                  "seeds": t.seeds, "solver": t.solver, "inserted_steps": t.inserted_steps,
                  "labels": parse_labels(t.labels) if t.labels is not None else None,
                  "prompts": read_prompts(t.prompts) if t.prompts is not None else None}
        gather_teacher(args.gather, out, expect)
        print(f"wrote {out} from the shards in {args.gather}")
        return 0
    backbone = common.load(cfg)   # it fixes the grid's σ range (and SD3's shift)
    tcfg = TeacherConfig.resolve(t, backbone, common.backbone_options(cfg), cfg.schedule.name, num_steps,
                                 cfg.schedule.rho)
    tracking.log_params({"teacher.config_hash": tcfg.hash})
    wrote = write_teacher(tcfg, out, progress=not args.no_progress, backbone=backbone, shard=args.shard)
    tracking.log_metrics({"num_samples": seed_count(tcfg.seeds), "wrote": int(wrote)})
    tracking.log_artifact(Path(out) / "manifest.json")
    print(f"{'wrote' if wrote else 'up to date, nothing written:'} {out} (config {tcfg.hash})")
    return 0
