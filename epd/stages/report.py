"""``epd report``: the summary table (solver x NFE x metrics) and plots of a pipeline's results folder."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import Config
from ..report import OUTPUTS, write_report
from . import common

HELP = "summary table (solver x NFE x metrics) and plots of a pipeline's results"
SECTIONS: tuple[str, ...] = ()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", required=True,
                   help="pipeline results folder: eval/<solver>-nfe<N>/summary.json, samples/<solver>-nfe<N>/, "
                        "tables/*.loss.csv and *.metrics.csv")
    p.add_argument("--out", required=True, help=f"output folder: {', '.join(OUTPUTS)}")
    common.add_config(p, SECTIONS)


def run(args: argparse.Namespace, cfg: Config) -> int:
    common.check_writable_dir(args.out, "report folder")
    print(write_report(args.results, args.out), end="")
    print(f"wrote {', '.join(str(Path(args.out) / n) for n in OUTPUTS)}")
    return 0
