"""``epd benchmark``: every solver x grid x NFE against a converged solve, on an embedded backbone."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..benchmark import DEFAULT_SOLVERS, BenchConfig, main
from ..config import Config
from ..schedules import SCHEDULES
from ..solvers import SOLVERS
from . import common

HELP = "every solver x grid x NFE against a converged solve on an embedded backbone"
SECTIONS = ("backbone",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    bench = BenchConfig()
    p.add_argument("--outdir", required=True, help="output folder: benchmark.csv and benchmark.md")
    p.add_argument("--solvers", nargs="+", choices=sorted(SOLVERS), default=DEFAULT_SOLVERS)
    p.add_argument("--schedules", nargs="+", choices=sorted(SCHEDULES), default=bench.schedules)
    p.add_argument("--nfes", nargs="+", type=int, default=bench.nfes)
    p.add_argument("--tables", nargs="*", default=[],
                   help="EPD tables to measure beside the solvers, as PATH or LABEL=PATH (same label: one row)")
    p.add_argument("--grids", nargs="*", default=[],
                   help="learned grids (`epd ld3`) to measure beside the solvers, as PATH or LABEL=PATH (default "
                        "label: ld3-SOLVER)")
    p.add_argument("--num-samples", type=int, default=bench.num_samples, help="samples per seed set")
    p.add_argument("--seed-sets", type=int, default=bench.seed_sets,
                   help="disjoint seed sets (their spread is the noise)")
    p.add_argument("--reference-steps", type=int, default=bench.reference_steps,
                   help="steps of the reference DPM-Solver++(3M) (default: gmm-digits 512, unet-digits 128)")
    p.add_argument("--reference-check", type=int, default=bench.reference_check,
                   help="samples re-solved with twice the reference steps to estimate its error")
    p.add_argument("--unconditional", action="store_true",
                   help="sample without labels (default: labels 0-9 cycled over the seeds)")
    p.add_argument("--batch", type=int, default=bench.batch_size)
    common.add_config(p, SECTIONS)


def run(args: argparse.Namespace, cfg: Config) -> int:
    for name in ("num_samples", "seed_sets", "batch", "reference_check"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    out = common.check_writable_dir(args.outdir, "output folder")
    bench = BenchConfig(
        backbone=cfg.backbone.name, backbone_options=common.backbone_options(cfg), solvers=args.solvers,
        schedules=args.schedules, nfes=args.nfes, tables=args.tables, grids=args.grids, num_samples=args.num_samples,
        seed_sets=args.seed_sets, batch_size=args.batch, reference_steps=args.reference_steps,
        reference_check=args.reference_check, labels=None if args.unconditional else BenchConfig().labels,
    )
    print(main(bench, Path(out), progress=not args.no_progress))
    print(f"wrote {Path(out) / 'benchmark.csv'} and {Path(out) / 'benchmark.md'}")
    return 0
