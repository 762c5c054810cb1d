"""``epd rdpo``: Stage 2, fine-tune an EPD table against a reward (Dirichlet policy, PPO + RLOO)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import distributed
from ..config import STAGE_SECTIONS, Config
from ..data import read_prompts
from ..rdpo import rdpo
from ..rdpo.heldout import compare_tables
from ..rewards import load_reward
from ..solvers import load_table
from . import common

HELP = "fine-tune an EPD table against a reward (Dirichlet policy, PPO + RLOO)"
SECTIONS = STAGE_SECTIONS["rdpo"]


def processes(cfg: Config) -> int:
    """How many processes the command runs on (epd relaunches itself under torchrun for more than one)."""
    return cfg.rdpo.processes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--table", required=True, help="start table (the distilled one), NAME.json")
    p.add_argument("--out", required=True,
                   help="stem: writes OUT.json/.safetensors (policy mean), OUT.metrics.csv/.png, OUT.ckpt.safetensors")
    p.add_argument("--eval-prompt-file", help="prompts of the held-out comparison (default: the training prompts)")
    p.add_argument("--eval-batch", type=int, default=256, help="samples per batch in the held-out comparison")
    common.add_config(p, SECTIONS)


def run(args: argparse.Namespace, cfg: Config) -> int:
    r = cfg.rdpo
    r.ppo.check_world_size(distributed.world_size())   # before a text-to-image model loads
    common.check_writable_file(f"{args.out}.json", "table")
    prompts = read_prompts(r.prompts)
    eval_prompts = read_prompts(args.eval_prompt_file) if args.eval_prompt_file else prompts
    start = load_table(args.table)
    reward = load_reward(r.reward, weights=cfg.weights,   # missing scorer weights fail here, before any work
                         **({"device": str(distributed.device())} if distributed.launched() else {}))
    backbone = common.load(cfg)
    table = rdpo(args.table, args.out, r.ppo, backbone=backbone, reward=reward, prompts=prompts,
                 backbone_options=common.backbone_options(cfg), progress=not args.no_progress)
    if not distributed.is_main():
        return 0
    print(f"wrote {args.out}.json (policy mean after {r.ppo.steps} steps), {args.out}.metrics.csv/.png")
    if r.eval_samples:   # on the main process only, after the others are done (no collective waits on it)
        names = (Path(args.table).name.removesuffix(".json"), Path(args.out).name)
        print(compare_tables(start, table, names, backbone, reward, eval_prompts, r.eval_samples,
                             Path(f"{args.out}.eval.json"), args.eval_batch))
    return 0
