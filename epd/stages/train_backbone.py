"""``epd train-backbone``: train an embedded network whose weights ship in data/weights."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..data import WEIGHTS_DIR
from ..train_backbone import ClassifierTrainConfig, UNetTrainConfig, train_classifier, train_unet
from . import common

HELP = "train an embedded network whose weights ship in data/weights"
SECTIONS = None   # no pipeline config: the training configs are the weights' own (recorded in their JSON)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--what", choices=["unet", "classifier"], required=True,
                   help="unet: the unet-digits denoiser; classifier: the digit feature network (FD-digits, rewards)")
    p.add_argument("--out", help="output folder (default: data/weights, where loading looks)")
    p.add_argument("--steps", type=int, help=f"unet: optimiser steps (default {UNetTrainConfig.steps})")
    p.add_argument("--epochs", type=int, help=f"classifier: epochs (default {ClassifierTrainConfig.epochs})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-metrics", action="store_true", help="unet: skip the FD-digits measurement after training")


def run(args: argparse.Namespace, cfg: None) -> int:
    out = common.check_writable_dir(args.out or WEIGHTS_DIR, "weights folder")
    if args.what == "unet":
        ucfg = UNetTrainConfig(seed=args.seed, threads=args.threads, **({"steps": args.steps} if args.steps else {}))
        path = train_unet(Path(out), ucfg, progress=not args.no_progress, metrics=not args.no_metrics)
    else:
        ccfg = ClassifierTrainConfig(seed=args.seed, threads=args.threads,
                                     **({"epochs": args.epochs} if args.epochs else {}))
        path = train_classifier(Path(out), ccfg, progress=not args.no_progress)
    print(f"wrote {path}, {path.with_suffix('.safetensors').name} and {path.with_suffix('.log.csv').name}")
    return 0
