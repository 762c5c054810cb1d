"""Before/after measurement of an RDPO run on held-out seeds: reward mean ± standard error and, on the embedded
digit backbones, label accuracy and FD-digits (against the training digits), for the start and the tuned table.

The same seeds and prompts serve both tables, so the per-sample reward difference gives a paired standard error,
much tighter than the two unpaired ones. Images go through ``epd.sample.generate`` (uint8, as ``epd sample``
writes them), so the figures are those ``epd evaluate`` would find on the PNGs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .. import tracking
from ..backbones import Backbone
from ..io import atomic_write
from ..data import labels_from_prompts
from ..metrics.digits import fd_digits, label_accuracy, train_digit_stats
from ..rewards import Reward
from ..sample import generate
from ..solvers import SolverTable
from ..solvers.plan import configure

DIGIT_BACKBONES = ("gmm-digits", "unet-digits")


def _mean_se(v: torch.Tensor) -> dict[str, float]:
    v = v.double()
    return {"mean": float(v.mean()), "se": float(v.std() / math.sqrt(len(v))), "n": len(v)}


def evaluate_table(table: SolverTable, backbone: Backbone, reward: Reward, seeds: list[int], prompts: list[str],
                   batch_size: int = 256) -> dict[str, Any]:
    """Scores of one table on ``seeds`` (prompt i mod len for seed i). Per-sample rewards are kept for pairing."""
    run = configure("epd_plugin" if table.meta.plugin else "epd", table=table)
    images = torch.cat([img for _, img in generate(backbone, run, seeds, prompts=prompts, batch_size=batch_size,
                                                    progress=False)])
    cycled = [prompts[i % len(prompts)] for i in range(len(seeds))]
    parts = reward.components(images, cycled) if hasattr(reward, "components") else {}
    total = reward.score(images, cycled)
    result: dict[str, Any] = {"reward": _mean_se(total), "per_sample": total,
                              **{name: _mean_se(v) for name, v in parts.items()}}
    if backbone.name in DIGIT_BACKBONES:
        labels = labels_from_prompts(cycled)
        if bool((labels >= 0).any()):
            result["label_accuracy"] = {"value": label_accuracy(images, labels)}
        result["fd_digits"] = {"value": fd_digits(images, train_digit_stats())}
    return result


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Paired reward difference (after − before) ± s.e., and the relative change of FD-digits."""
    out = {"reward_diff": _mean_se(after["per_sample"] - before["per_sample"])}
    if "fd_digits" in before:
        b, a = before["fd_digits"]["value"], after["fd_digits"]["value"]
        out["fd_digits_change"] = {"value": (a - b) / b}
    return out


def format_comparison(before: dict[str, Any], after: dict[str, Any], names: tuple[str, str],
                      title: str = "") -> str:
    """A Markdown table: one row per table, then the paired difference."""
    parts = [k for k, v in before.items() if isinstance(v, dict) and "se" in v and k != "reward"]
    head = ["table", "reward (mean ± s.e.)", *parts, "label acc.", "FD-digits"]
    rows = []
    for name, r in zip(names, (before, after)):
        cells = [name, *(f"{r[k]['mean']:.4f} ± {r[k]['se']:.4f}" for k in ["reward", *parts])]
        cells.append(f"{r['label_accuracy']['value']:.3f}" if "label_accuracy" in r else "–")
        cells.append(f"{r['fd_digits']['value']:.4f}" if "fd_digits" in r else "–")
        rows.append(cells)
    diff = compare(before, after)
    d = diff["reward_diff"]
    last = [f"{names[1]} − {names[0]} (paired)", f"{d['mean']:+.4f} ± {d['se']:.4f}"]
    last += [f"{after[k]['mean'] - before[k]['mean']:+.4f}" for k in parts]
    last.append(f"{after['label_accuracy']['value'] - before['label_accuracy']['value']:+.3f}"
                if "label_accuracy" in before else "–")
    last.append(f"{100 * diff['fd_digits_change']['value']:+.1f} %" if "fd_digits_change" in diff else "–")
    rows.append(last)
    lines = [f"| {' | '.join(head)} |", f"|{'---|' * len(head)}", *(f"| {' | '.join(r)} |" for r in rows)]
    n = before["reward"]["n"]
    return "\n".join(([title, ""] if title else []) + lines + ["", f"{n} held-out samples per table."])


def flat_metrics(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """The comparison as flat ``{name: number}`` (MLflow metrics, the eval JSON)."""
    out: dict[str, float] = {}
    for prefix, r in (("before", before), ("after", after)):
        for key, v in r.items():
            if isinstance(v, dict):
                for stat in ("mean", "se", "value"):
                    if stat in v:
                        out[f"{prefix}_{key}_{stat}"] = float(v[stat])
    for key, v in compare(before, after).items():
        for stat in ("mean", "se", "value"):
            if stat in v:
                out[f"{key}_{stat}"] = float(v[stat])
    return out




def compare_tables(start: SolverTable, tuned: SolverTable, names: tuple[str, str], backbone: Backbone,
                   reward: Reward, prompts: list[str], num_samples: int, out: Path,
                   batch_size: int = 256) -> str:
    """Start and tuned table on held-out seeds 0..num_samples−1 (prompts cycled): writes ``out`` (JSON of
    :func:`flat_metrics`), logs the metrics, and returns the printed comparison."""
    seeds = list(range(num_samples))
    before, after = (evaluate_table(t, backbone, reward, seeds, prompts, batch_size) for t in (start, tuned))
    metrics = flat_metrics(before, after)
    tracking.log_metrics(metrics)
    atomic_write(out, (json.dumps({"tables": list(names), "seeds": f"0-{num_samples - 1}", **metrics},
                                  indent=2) + "\n").encode())
    tracking.log_artifact(out)
    return format_comparison(before, after, names, title=f"held-out seeds 0-{num_samples - 1}, NFE {tuned.meta.nfe}")


__all__ = ["compare", "compare_tables", "evaluate_table", "flat_metrics", "format_comparison"]
