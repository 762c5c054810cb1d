"""`epd report`: the summary table and plots from a results folder; bad input refused, nothing half-written."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from epd.cli import main
from epd.report import format_table, read_summaries


def fake_results(root, runs, rms=None):
    """A results folder as the pipeline lays it out, with made-up numbers (``rms``: each run's rms_to_reference)."""
    for name, acc in runs.items():
        (root / "eval" / name).mkdir(parents=True)
        summary = {"label_accuracy": {"mean": acc, "std": 0.1, "n": 4}, "fd_digits": {"value": 1 / acc}}
        if rms is not None:
            summary["rms_to_reference"] = {"mean": rms[name], "std": 0.01, "n": 4}
        (root / "eval" / name / "summary.json").write_text(json.dumps(summary))
        folder = root / "samples" / name
        folder.mkdir(parents=True)
        with (folder / "samples.csv").open("w") as f:
            f.write("seed,label,prompt,path\n")
            for seed in range(4):
                Image.fromarray(np.full((8, 8), 40 * seed, np.uint8)).save(folder / f"{seed:06d}.png")
                f.write(f"{seed},,a handwritten {seed},{seed:06d}.png\n")
    (root / "tables").mkdir()
    (root / "tables" / "epd-nfe3.loss.csv").write_text("iteration,loss\n1,0.5\n2,0.25\n")
    (root / "tables" / "rdpo-nfe3.metrics.csv").write_text("step,reward_mean,kl\n0,-2.0,0\n1,-1.5,0.01\n")


def test_report_table_and_plots(tmp_path, capsys):
    fake_results(tmp_path / "res", {"euler-nfe5": 0.5, "euler-nfe3": 0.25, "rdpo-nfe3": 0.8, "epd-nfe3": 0.75})
    assert main(["report", "--results", str(tmp_path / "res"), "--out", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("| ") and "---" not in line]
    # learned tables first, then baselines; NFE ascending; mean ± std for per-image metrics, value for set-level
    # the best row of each NFE in bold: higher accuracy, lower FD; alone at its NFE, nothing is bold
    assert lines[1:] == ["| epd | 3 | 0.75 ± 0.1 | 1.333 |", "| rdpo | 3 | **0.8 ± 0.1** | **1.25** |",
                         "| euler | 3 | 0.25 ± 0.1 | 4 |", "| euler | 5 | 0.5 ± 0.1 | 2 |"]
    assert "Model and solver together" in printed and "Solver accuracy" not in printed
    with (tmp_path / "rep" / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["solver"], int(r["nfe"]), float(r["label_accuracy_mean"]), float(r["fd_digits"])) for r in rows] == [
        ("epd", 3, 0.75, pytest.approx(4 / 3)), ("rdpo", 3, 0.8, 1.25), ("euler", 3, 0.25, 4.0), ("euler", 5, 0.5, 2.0)]
    for name in ("quality_vs_nfe.png", "curves.png", "grids.png"):
        with Image.open(tmp_path / "rep" / name) as img:
            assert img.width > 200 and img.height > 100


def test_report_refuses_unnamed_run_and_writes_nothing(tmp_path, capsys):
    fake_results(tmp_path / "res", {"epd-nfe3": 0.75, "final": 0.5})
    assert main(["report", "--results", str(tmp_path / "res"), "--out", str(tmp_path / "rep")]) == 2
    assert "'final'" in capsys.readouterr().err
    assert not (tmp_path / "rep").exists()


def test_report_refuses_missing_results(tmp_path, capsys):
    assert main(["report", "--results", str(tmp_path / "none"), "--out", str(tmp_path / "rep")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_format_table_leaves_missing_metrics_blank(tmp_path):
    for name, summary in {"a-nfe3": {"x": {"mean": 1.0, "std": 0.0, "n": 1}}, "b-nfe3": {"y": {"value": 2.0}}}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    rows = read_summaries([tmp_path / "a-nfe3" / "summary.json", tmp_path / "b-nfe3" / "summary.json"])
    assert format_table(rows).splitlines()[2:4] == ["| a | 3 | 1 ± 0 |  |", "| b | 3 |  | 2 |"]


def test_the_reference_row_and_the_solver_accuracy_metrics_first(tmp_path, capsys):
    """The reference's samples are evaluated like any: its row comes last with no NFE and competes for no bold; the
    accuracy metrics lead the table (lower is better), the note says which metric measures what, and the reference's
    own error (its reference.json) is stated."""
    runs = {"epd-nfe3": 0.75, "euler-nfe3": 0.9, "reference": 0.95}
    fake_results(tmp_path / "res", runs, rms={"epd-nfe3": 0.02, "euler-nfe3": 0.3, "reference": 0.0})
    (tmp_path / "res" / "samples" / "reference" / "reference.json").write_text(json.dumps(
        {"backbone": "gmm-digits", "backbone_options": {}, "steps": 512, "samples": 4, "rms": 1.5e-5,
         "same_mode": 1.0}))
    assert main(["report", "--results", str(tmp_path / "res"), "--out", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("| ")]
    assert lines[0] == "| solver | NFE | rms_to_reference | label_accuracy | fd_digits |"
    # EPD is the more accurate solver though Euler's samples score higher against data
    assert lines[1:] == ["| epd | 3 | **0.02 ± 0.01** | 0.75 ± 0.1 | 1.333 |",
                         "| euler | 3 | 0.3 ± 0.01 | **0.9 ± 0.1** | **1.111** |",
                         "| reference | — | 0 ± 0.01 | 0.95 ± 0.1 | 1.053 |"]
    assert "Solver accuracy (distance to the reference solution of the same seeds and conditions): " \
           "rms_to_reference." in printed
    assert "Model and solver together" in printed and "label_accuracy, fd_digits." in printed
    assert "512 steps uniform in log σ; against 1024 steps on 4 samples, state RMS 1.50e-05, same mode 1.0000." \
           in printed
    with (tmp_path / "rep" / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["solver"], r["nfe"]) for r in rows] == [("epd", "3"), ("euler", "3"), ("reference", "")]


def test_grid_images_spread_over_the_prompts(tmp_path):
    from epd.report import sample_images

    with (tmp_path / "samples.csv").open("w") as f:
        f.write("seed,label,prompt,path\n")
        for seed in range(80):  # 40 prompts cycled, 4 per digit as in data/prompts/digits.txt
            f.write(f"{seed},,prompt {seed % 40} (digit {seed % 40 // 4}),{seed:06d}.png\n")
    picked = sample_images(tmp_path, 10)
    assert [int(p.stem) for p in picked] == list(range(0, 40, 4))
    assert [int(p.stem) for p in sample_images(tmp_path, 50)] == list(range(50))  # fewer prompts than images


def test_learned_peer_row_named_by_its_solver(tmp_path, capsys):
    """An LD3 grid's row comes after EPD and RDPO, named by the solver its grid file holds; a file there that is no
    grid is refused, naming it."""
    from epd.solvers import SolverGrid, save_grid

    res = tmp_path / "res"
    fake_results(res, {"euler-nfe3": 0.25, "ld3-nfe3": 0.6, "epd-nfe3": 0.75})
    save_grid(SolverGrid("ipndm", (80.0, 2.0, 0.1, 0.002), backbone="gmm-digits"), res / "tables" / "ld3-nfe3")
    assert main(["report", "--results", str(res), "--out", str(tmp_path / "rep")]) == 0
    rows = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert rows == ["| epd", "| LD3 (iPNDM)", "| euler"]
    (res / "tables" / "ld3-nfe5.json").write_text("[]")
    assert main(["report", "--results", str(res), "--out", str(tmp_path / "rep2")]) == 2
    assert "ld3-nfe5.json is not a grid file" in capsys.readouterr().err and not (tmp_path / "rep2").exists()
