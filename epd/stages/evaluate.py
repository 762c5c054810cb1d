"""``epd evaluate``: score a sample folder (samples.csv + PNGs): per-image CSV and summary JSON."""
from __future__ import annotations

import argparse

from ..config import STAGE_SECTIONS, Config
from ..evaluate import evaluate
from . import common

HELP = "score a sample folder (samples.csv + PNGs): per-image CSV and summary JSON"
SECTIONS = STAGE_SECTIONS["evaluate"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", required=True, help="folder written by `epd sample` (samples.csv + PNGs)")
    p.add_argument("--out", help="output folder: per_image.csv and summary.json")
    p.add_argument("--reference", metavar="DIR",
                   help="the reference solver's samples of the same seeds and conditions (`epd sample --solver "
                        "reference`): for the solver-accuracy metrics")
    p.add_argument("--write-reference-stats", metavar="FILE",
                   help="save this sample set's Inception statistics as an FID reference (.npz)")
    common.add_config(p, SECTIONS)


def run(args: argparse.Namespace, cfg: Config) -> int:
    e = cfg.evaluate
    if args.out is None and args.write_reference_stats is None:
        raise ValueError("give --out (scores) and/or --write-reference-stats (an FID reference)")
    if args.out is not None:
        common.check_writable_dir(args.out, "output folder")
    if args.write_reference_stats is not None:
        common.check_writable_file(args.write_reference_stats, "reference statistics file")
    summary = evaluate(args.samples, e.metrics if args.out is not None else [], args.out, weights=cfg.weights,
                       reference_stats=e.reference_stats, write_reference_stats=args.write_reference_stats,
                       reference=args.reference, batch_size=e.batch, device=e.device,
                       progress=not args.no_progress)
    for metric, s in summary.items():
        print(f"{metric}: " + (f"{s['value']:.4f}" if "value" in s else
                               "n/a" if s["mean"] is None else f"{s['mean']:.4f} ± {s['std']:.4f} (n={s['n']})"))
    wrote = [f"{args.out}/per_image.csv, summary.json"] if args.out is not None else []
    wrote += [args.write_reference_stats] if args.write_reference_stats else []
    print(f"wrote {' and '.join(wrote)}")
    return 0
