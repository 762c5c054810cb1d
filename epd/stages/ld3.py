"""``epd ld3``: the learned-grid peer, a hand-designed solver's grid fitted to teacher trajectories (LD3)."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from .. import tracking
from ..config import STAGE_SECTIONS, Config
from ..ld3 import LD3Config, learn_grid
from . import common

HELP = "learn the grid of a hand-designed solver (ld3.solver) from teacher trajectories (LD3)"
SECTIONS = STAGE_SECTIONS["ld3"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher folder written by `epd teacher` (its first and last "
                                                    "states are used, so EPD's teacher of any NFE serves)")
    p.add_argument("--out", required=True, help="grid path stem: writes OUT.json (the grid), OUT.loss.csv/.loss.png")
    p.add_argument("--nfe", type=int, required=True, help="denoiser calls of the solver on the grid")
    common.add_config(p, SECTIONS)


def run(args: argparse.Namespace, cfg: Config) -> int:
    common.check_writable_file(f"{args.out}.json", "grid")
    run_cfg = LD3Config(**dataclasses.asdict(cfg.ld3), nfe=args.nfe)
    grid = learn_grid(args.teacher, args.out, run_cfg, progress=not args.no_progress)
    prov = json.loads(Path(f"{args.out}.json").read_text())["provenance"]
    tracking.set_tags({"solver": f"ld3_{grid.solver}", "nfe": grid.nfe, "backbone": grid.backbone,
                       "schedule": grid.schedule})
    tracking.log_metrics({"val_loss": prov["val_loss"], "start_val_loss": prov["start_val_loss"]})
    for suffix in (".json", ".loss.csv", ".loss.png"):
        tracking.log_artifact(f"{args.out}{suffix}", "grid")
    print(f"wrote {args.out}.json ({grid.solver}, nfe={grid.nfe}): held-out teacher loss {prov['start_val_loss']:.3e} "
          f"on the start grid, {prov['val_loss']:.3e} on the learned one")
    return 0
