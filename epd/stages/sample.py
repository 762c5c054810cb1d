"""``epd sample``: images from seeds with a baseline solver at an NFE, a hand-set EPD table, or a table file."""
from __future__ import annotations

import argparse
import json

import torch

from .. import distributed, tracking
from ..config import STAGE_SECTIONS, Config
from ..data import parse_labels, parse_seeds, read_prompts
from ..options import given_flags, json_object
from ..sample import (check_sample_dir, encode_cycled, gather_samples, generate, save_grid, shard_slices,
                      write_samples)
from ..solvers import SOLVERS, load_grid, load_table, reference_error
from ..solvers.grid import is_grid_file
from ..solvers.table import EXPLICIT
from ..solvers.plan import check_grid_use, check_table_use, configure_for
from . import common

HELP = "generate images with a baseline solver or an EPD table"
SECTIONS = STAGE_SECTIONS["sample"]


class _BackendConfig(argparse.Action):
    """``--backend-config JSON``: backbone options as one JSON object, each stored as if given by its own flag."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            given = json_object(values)
        except argparse.ArgumentTypeError as e:
            parser.error(f"{option_string}: {e}")
        for key, value in given.items():
            setattr(namespace, f"backbone.options.{key}", value)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--outdir", required=True, help="output folder: one PNG per seed and samples.csv")
    p.add_argument("--solver", choices=sorted(SOLVERS), default="epd",
                   help="solver (epd: a hand-set table unless --table is given; reference: the converged solution, "
                        "sample.reference_steps on a log-σ grid, its own error in reference.json)")
    p.add_argument("--nfe", type=int, default=5, help="denoiser calls per sample (a --table fixes its own)")
    p.add_argument("--table", help="EPD table (NAME.json / NAME.safetensors) or learned grid (`epd ld3`, NAME.json: "
                                   "its solver on its grid); fixes solver, grid and NFE")
    p.add_argument("--num-points", type=int, default=2, help="K of a hand-set EPD table")
    p.add_argument("--prompt", help='one prompt for all seeds, e.g. "a handwritten 3" (instead of --labels or '
                                    '--prompt-file)')
    p.add_argument("--grid", action="store_true", help="write one grid.png instead of one PNG per seed")
    p.add_argument("--overwrite", action="store_true", help="replace the samples an existing --outdir holds")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--shard", type=int, metavar="I",
                       help="sample only shard I of the seeds (sample.shard_size each; one job of a sharded set)")
    split.add_argument("--gather", metavar="DIR",
                       help="make --outdir from the shard folders DIR/0, DIR/1, … (checked complete; no sampling)")
    p.add_argument("--backend-config", action=_BackendConfig, metavar="JSON",
                   help='backbone options as one JSON object (inline or a .json file), e.g. \'{"max_batch": 8, '
                        '"load_options": {"variant": "fp16"}}\'')
    common.add_config(p, SECTIONS)


def _reference_error(backbone, run_, seeds, labels, prompts, batch: int) -> dict:
    """The reference's own error on the first seeds (conditions cycled as for the samples): against twice the steps."""
    cond = encode_cycled(backbone, range(len(seeds)), labels, prompts)
    err = reference_error(backbone, backbone.noise(seeds), len(run_.sigmas), sigma_min=backbone.sigma_min,
                          sigma_max=backbone.sigma_max, cond=cond, data=backbone.data, batch_size=batch)
    return {"steps": err.steps, "samples": err.samples, "rms": err.rms, "same_mode": err.same_mode}


def run(args: argparse.Namespace, cfg: Config) -> int:
    s = cfg.sample
    if args.prompt is not None and (s.labels is not None or s.prompts is not None):
        raise ValueError("give one of --prompt, --labels, --prompt-file")
    if args.num_points < 1:
        raise ValueError(f"--num-points must be >= 1, got {args.num_points}")
    seeds = parse_seeds(s.seeds)
    labels = parse_labels(s.labels) if s.labels is not None else None
    prompts = [args.prompt] if args.prompt is not None else read_prompts(s.prompts) if s.prompts else None
    if (args.shard is not None or args.gather) and (args.grid or s.shard_size is None):
        raise ValueError("--shard and --gather split a sample folder by sample.shard_size (set it; not with --grid)")
    if args.gather:
        gather_samples(args.gather, args.outdir, seeds, labels=labels, prompts=prompts, shard_size=s.shard_size,
                       subdirs=s.subdirs, overwrite=args.overwrite)
        print(f"{len(seeds)} samples gathered from {args.gather} -> {args.outdir}")
        return 0
    if args.shard is not None:   # this shard's seeds, each with the condition of its place in the whole list
        pieces = shard_slices(len(seeds), s.shard_size)
        if not 0 <= args.shard < len(pieces):
            raise ValueError(f"sample shard {args.shard} does not exist: {len(seeds)} seeds in shards of "
                             f"{s.shard_size} make {len(pieces)} (0-{len(pieces) - 1})")
        part = pieces[args.shard]
        labels = None if labels is None else [labels[i % len(labels)] for i in range(part.start, part.stop)]
        prompts = None if prompts is None else [prompts[i % len(prompts)] for i in range(part.start, part.stop)]
        seeds = seeds[part]
    if args.grid:
        common.check_writable_file(f"{args.outdir}/grid.png", "grid")
    else:
        check_sample_dir(common.check_writable_dir(args.outdir, "output folder"), args.overwrite)
    grid = load_grid(args.table) if args.table and is_grid_file(args.table) else None
    table = load_table(args.table) if args.table and grid is None else None
    # An explicit --schedule must be the table's own (a table fixes its grid); one that carries a grid learned on
    # a schedule also refuses a config of another schedule (the config's other stages ran on that one).
    asked = given_flags(args, "schedule").get("name")
    if args.config and asked is None and (grid is not None or (table is not None and table.meta.grid is not None
                                                                and table.meta.schedule != EXPLICIT)):
        asked = cfg.schedule.name
    if table is not None:
        check_table_use(table, schedule=asked, source=args.table)
    if grid is not None:
        check_grid_use(grid, schedule=asked, source=args.table)
    backbone = common.load(cfg)
    reference = args.solver == "reference" and args.table is None
    run_ = configure_for(backbone, args.solver, None if args.table or reference else args.nfe, table=table,
                         grid=grid, schedule=cfg.schedule.name, rho=cfg.schedule.rho, num_points=args.num_points,
                         steps=s.reference_steps if reference else None)
    if args.grid and distributed.world_size() > 1:
        raise ValueError("--grid is one image from one process: run it without torchrun")
    extra = {}
    if reference and not args.grid and args.shard in (None, 0) and distributed.is_main():
        # what made the reference (evaluate's mode_agreement loads this backbone) and, checked, its own error
        info = {"backbone": backbone.name, "backbone_options": common.backbone_options(cfg),
                "steps": len(run_.sigmas), "samples": 0, "rms": None, "same_mode": None}
        if s.reference_check:
            info |= _reference_error(backbone, run_, seeds[:s.reference_check], labels, prompts, s.batch)
            tracking.log_metrics({f"reference_{k}": v for k in ("rms", "same_mode")
                                  if isinstance(v := info[k], float)})
            print(f"reference: {info['steps']} steps, against {2 * info['steps']} on {info['samples']} samples: "
                  f"state RMS {info['rms']:.2e}" + (f", same mode {info['same_mode']:.4f}"
                                                     if info["same_mode"] is not None else ""))
        extra["reference.json"] = (json.dumps(info, indent=2) + "\n").encode()
    if args.grid:
        images = torch.cat([img for _, img in generate(backbone, run_, seeds, labels=labels, prompts=prompts,
                                                       batch_size=s.batch, progress=not args.no_progress)])
        out = f"{args.outdir}/grid.png"
        save_grid(images, common.check_writable_file(out, "grid"))
        tracking.log_artifact(out)
    else:
        out = write_samples(backbone, run_, seeds, args.outdir, labels=labels, prompts=prompts, batch_size=s.batch,
                            subdirs=s.subdirs, overwrite=args.overwrite, progress=not args.no_progress,
                            extra_files=extra)
    tracking.set_tags({"solver": f"ld3_{run_.name}" if grid is not None else run_.name, "nfe": run_.nfe,
                       "backbone": backbone.name, "schedule": table.meta.schedule if table is not None else
                       grid.schedule if grid is not None else cfg.schedule.name})
    tracking.log_metrics({"num_samples": len(seeds)})
    if distributed.is_main():
        print(f"{len(seeds)} samples, solver={run_.name} nfe={run_.nfe} -> {out}")
    return 0
