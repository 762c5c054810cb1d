"""``epd import-table``: an EPD authors' predictor snapshot (.pkl) as an epd table, read without running it."""
from __future__ import annotations

import argparse

from ..solvers import load_table
from ..solvers.table import AFS_CONVENTIONS
from ..upstream import write_imported_table
from . import common

HELP = "turn a published EPD table (upstream .pkl snapshot) into an epd table, running nothing from the pickle"
SECTIONS = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("snapshot", help="upstream predictor snapshot, e.g. exps/sd15/sd15-best.pkl")
    p.add_argument("--out", required=True, help="table path stem: writes OUT.json and OUT.safetensors")
    p.add_argument("--afs-convention", choices=AFS_CONVENTIONS, default="upstream",
                   help="first-step direction of the sampler: upstream's x/sqrt(1+σ²), as the table was trained, or "
                        "epd's x/σ")


def run(args: argparse.Namespace, cfg: None) -> int:
    common.check_writable_file(f"{args.out}.json", "table")
    path = write_imported_table(args.snapshot, args.out, afs_convention=args.afs_convention)
    m = load_table(path).meta
    grid = "its own grid" if m.grid is not None else f"schedule {m.schedule} {m.schedule_args or ''}".strip()
    print(f"wrote {path}: NFE {m.nfe}, K={m.num_points}, {'EPD-Plugin' if m.plugin else 'EPD'}, "
          f"backbone {m.backbone or 'any'}, {grid}, guidance {m.guidance}")
    return 0
