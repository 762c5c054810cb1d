"""``epd distill``: Stage 1, fit an EPD table to teacher trajectories."""
from __future__ import annotations

import argparse
import dataclasses

from .. import tracking
from ..config import STAGE_SECTIONS, Config
from ..distill import DistillConfig, adopt_table, distill
from . import common

HELP = "fit an EPD table to teacher trajectories"
SECTIONS = STAGE_SECTIONS["distill"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher folder written by `epd teacher`")
    p.add_argument("--out", required=True, help="table path stem: writes OUT.json/.safetensors/.loss.csv/.loss.png")
    p.add_argument("--nfe", type=int, required=True, help="denoiser calls of the table (the teacher's grid fits it)")
    common.add_config(p, SECTIONS)


def run(args: argparse.Namespace, cfg: Config) -> int:
    common.check_writable_file(f"{args.out}.json", "table")
    start = cfg.distill.start_tables.get(args.nfe)
    if start is not None:   # a finished table instead of a distillation (the teacher is not read)
        table = adopt_table(start, args.out, args.nfe)
        print(f"wrote {args.out}.json: {start} as the table for NFE {args.nfe} (distill.start_tables)")
        return 0
    run_cfg = DistillConfig(**dataclasses.asdict(cfg.distill), nfe=args.nfe)
    table = distill(args.teacher, args.out, run_cfg, progress=not args.no_progress)
    meta = table.meta
    tracking.set_tags({"solver": "epd_plugin" if meta.plugin else "epd", "nfe": meta.nfe, "backbone": meta.backbone,
                       "schedule": meta.schedule})
    for suffix in (".json", ".safetensors", ".loss.csv", ".loss.png"):
        tracking.log_artifact(f"{args.out}{suffix}", "table")
    print(f"wrote {args.out}.json (nfe={meta.nfe}, K={meta.num_points}, plugin={meta.plugin})")
    return 0
