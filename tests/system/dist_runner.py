"""Runs test tasks (RDPO runs, sample folders) under torchrun for tests/test_distributed.py, and in the test process
itself for the single-process references: ``torchrun --nproc-per-node 2 --standalone tests/system/dist_runner.py SPEC``.

SPEC is a JSON file ``{"root": folder, "tasks": [...], "raise_at_end"?: bool}``; the tasks run in one
``epd.distributed.session()``. Each rank prints one line ``DIST-RUNNER {json}`` at the end: its rank, the world
size, the paths under ``root`` it opened for writing, created or renamed (an audit hook records them), the messages
of the ValueErrors of tasks that expected one, whether the session left the process group (``group_left``), and
what joining it again said (``rejoin``).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

DISTILLED = str(Path(__file__).resolve().parents[2] / "data" / "tables" / "epd-time_uniform-nfe5.json")
PROMPTS = ["a handwritten 3", "the digit seven", "a handwritten 0", "the number one, handwritten"]
REWARD = {"label_logprob": 1.0, "realism": 0.5}


def run_task(task: dict) -> None:
    """One task: ``{"kind": "rdpo", "out", "cfg", "stop_after"?}``, the same wrapped in a tracked stage run
    (``"kind": "track"``, with ``"uri"``), or ``{"kind": "sample", "outdir", "seeds", "batch_size", "solver",
    "nfe"?, "table"?, "labels"?, "prompts"?}``."""
    from epd.backbones import load_backbone

    backbone = load_backbone("gmm-digits")
    if task["kind"] in ("rdpo", "track"):
        from epd import tracking
        from epd.rdpo import RDPOConfig, rdpo
        from epd.rewards import load_reward

        def run():
            rdpo(DISTILLED, task["out"], RDPOConfig(**task["cfg"]), backbone=backbone, reward=load_reward(REWARD),
                 prompts=PROMPTS, progress=False, stop_after=task.get("stop_after"))

        if task["kind"] == "track":
            with tracking.stage_run("rdpo", uri=task["uri"], experiment="dist"):
                run()
        else:
            run()
    elif task["kind"] == "sample":
        from epd.sample import write_samples
        from epd.solvers import load_table
        from epd.solvers.plan import configure

        table = load_table(task["table"]) if task.get("table") else None
        solver = configure(task["solver"], task.get("nfe"), table=table, schedule="time_uniform")
        write_samples(backbone, solver, task["seeds"], task["outdir"], labels=task.get("labels"),
                      prompts=task.get("prompts"), batch_size=task["batch_size"], progress=False)
    else:
        raise ValueError(f"unknown task kind {task['kind']!r}")


def _writes(root: Path) -> list[str]:
    """Start recording what this process writes under ``root``; returns the (growing) list of relative paths,
    each once."""
    seen: list[str] = []
    root = root.resolve()

    def note(path) -> None:
        if isinstance(path, (str, bytes, os.PathLike)):
            p = Path(os.fsdecode(path)).resolve()
            if p.is_relative_to(root) and str(p.relative_to(root)) not in seen:
                seen.append(str(p.relative_to(root)))

    def hook(event, args):
        if event == "open" and args[0] is not None:
            path, mode, flags = args
            if (mode and any(c in mode for c in "wax+")) or (mode is None and flags & (os.O_WRONLY | os.O_RDWR)):
                note(path)
        elif event in ("os.rename", "os.mkdir", "os.remove", "shutil.rmtree"):
            for a in args[:2] if event == "os.rename" else args[:1]:
                note(a)

    sys.addaudithook(hook)
    return seen


def main(spec_path: str) -> None:
    from epd import distributed

    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    writes = _writes(Path(spec["root"]))
    errors: list[str] = []
    report = {"writes": writes, "errors": errors}
    try:
        with distributed.session():
            report.update(rank=distributed.rank(), world=distributed.world_size())
            for task in spec["tasks"]:
                if task.get("expect_error"):
                    try:
                        run_task(task)
                    except ValueError as e:
                        errors.append(str(e))
                    else:
                        errors.append("no error")
                else:
                    run_task(task)
            if spec.get("raise_at_end"):
                raise RuntimeError("deliberate")
    except RuntimeError as e:
        report["raised"] = str(e)
    report["group_left"] = not distributed.is_initialized()   # the session left the group, also on error
    try:
        distributed.init()
    except ValueError as e:
        report["rejoin"] = str(e)
    # a file per rank: the ranks' stdout lines share one pipe and a long line can interleave with another's
    Path(spec["reports"], f"{os.environ['RANK']}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
