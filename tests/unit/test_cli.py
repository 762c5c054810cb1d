"""The command line as a list of commands: each has its --help with every default shown, --version, one thread by
default, and errors that name the problem instead of a traceback; every Snakemake rule and DVC stage is one `epd`
command line."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch
import yaml

from epd.cli import COMMANDS, build_parser, main

REPO = Path(__file__).resolve().parents[2]


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


def test_version(capsys):
    assert main(["--version"]) == 0
    assert re.fullmatch(r"epd \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_shows_every_default(name, capsys):
    assert main([name, "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: epd")
    parser = _subparser(name)
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and action.help:
            assert "default" in parser._get_formatter()._format_action(action), action.option_strings


def test_threads_default_to_one(tmp_path):
    torch.set_num_threads(2)
    try:
        assert main(["sample", "--solver", "euler", "--nfe", "3", "--seeds", "0-1", "--outdir", str(tmp_path / "s"),
                     "--no-progress"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("argv, message", [
    (["sample", "--outdir", "{tmp}/s", "--batch", "0"], "sample.batch: Input should be greater than or equal to 1"),
    (["sample", "--outdir", "{tmp}/s", "--threads", "0"], "--threads must be >= 1"),
    (["sample", "--outdir", "{tmp}/s", "--schedule", "discrete"], "schedule 'discrete' does not fit backbone"),
    (["sample", "--outdir", "{tmp}/s", "--seeds", "0-999999999999"], "names 1,000,000,000,000 seeds"),
    (["distill", "--teacher", "{tmp}/none", "--out", "{tmp}/t", "--nfe", "3"], "teacher missing"),
    (["evaluate", "--samples", "{tmp}", "--out", "{tmp}/e", "--config", "{tmp}/none.yaml"], "does not exist"),
])
def test_user_errors_are_messages_not_tracebacks(tmp_path, capsys, argv, message):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _rule_commands() -> dict[str, str]:
    """Every rule's shell command (its string literals joined), from the rule files."""
    out = {}
    for path in (REPO / "workflow" / "rules").glob("*.smk"):
        text = path.read_text()
        for m in re.finditer(r"(?m)^(\s*)rule (\w+):\n(?:\1    .*\n|\n)*?\1    shell:\n((?:\1        .*\n)+)", text):
            out[m[2]] = "".join(re.findall(r'"([^"]*)"', m[3]))
    return out


def test_every_rule_and_dvc_stage_is_one_epd_command():
    rules = _rule_commands()
    assert set(rules) >= {"teacher", "distill", "rdpo", "sample_table", "sample_baseline", "evaluate", "report"}
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    cmds = {name: (s.get("do") or s)["cmd"] for name, s in stages.items()}
    for name, cmd in [*rules.items(), *cmds.items()]:
        body = cmd.split(" > {log}")[0]
        assert body.startswith("epd ") and not re.search(r"&&|;|\|", body), (name, cmd)
        assert "--config" in body or name == "report", (name, cmd)


# The probes of a user pushing past the first run: each refused before any work, naming the problem, nothing written.
@pytest.mark.parametrize("argv, message", [
    (["sample", "--outdir", "{tmp}/file.txt"], "output folder {tmp}/file.txt is a file"),
    (["sample", "--outdir", "{tmp}/full", "--seeds", "0-1"], "output folder {tmp}/full is not empty; pass --overwrite"),
    (["sample", "--outdir", "{tmp}/s", "--batch", "-4"], "sample.batch: Input should be greater than or equal to 1"),
    (["sample", "--outdir", "{tmp}/s", "--seeds", "1,1,1"], "names seed 1 twice"),
    (["sample", "--outdir", "{tmp}/s", "--prompt-file", "{tmp}/empty.txt"], "{tmp}/empty.txt lists no prompts"),
    (["sample", "--outdir", "{tmp}/s", "--prompt-file", "{tmp}/latin1.txt"], "{tmp}/latin1.txt, line 1: not UTF-8"),
    (["evaluate", "--samples", "{tmp}/full", "--out", "{tmp}/file.txt"], "output folder {tmp}/file.txt is a file"),
    (["rdpo", "--table", "{tmp}/t.json", "--out", "{tmp}/r", "--reward", "realsim"], "rdpo.reward: Input should be"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, capsys, argv, message):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.png").write_bytes(b"x")
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message.replace("{tmp}", str(tmp_path)) in err and "Traceback" not in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """As root every folder is writable, so the check is shown with os.access saying no (the check asks it)."""
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(str(tmp_path / "ro")) else
                        real(p, mode))
    (tmp_path / "ro").mkdir()
    assert main(["sample", "--outdir", str(tmp_path / "ro" / "s"), "--no-progress"]) == 2
    assert f"{tmp_path / 'ro'} is not writable" in capsys.readouterr().err


def test_sampling_over_an_existing_folder_replaces_it_whole(tmp_path):
    """--overwrite: the new samples replace the old folder whole, so no stale PNG survives beside them."""
    args = ["sample", "--solver", "euler", "--nfe", "3", "--no-progress", "--outdir", str(tmp_path / "s")]
    assert main([*args, "--seeds", "0-5"]) == 0
    assert main([*args, "--seeds", "0-2", "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "s").rglob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    assert len((tmp_path / "s" / "samples.csv").read_text().splitlines()) == 4


def test_a_bad_prompt_file_named_in_a_config_is_refused_up_front_leaving_no_trace(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)   # where a stage run with --config would stamp results/<experiment>/config/
    (tmp_path / "latin1.txt").write_bytes(b"one\ncaf\xe9\n")
    (tmp_path / "c.yaml").write_text("tracking: {uri: null}\nsample: {prompts: latin1.txt}\n")
    message = "sample.prompts: prompt file latin1.txt, line 2: not UTF-8 text (byte 0xe9)"
    assert main(["config", "show", "--config", "c.yaml"]) == 2
    assert message in capsys.readouterr().err
    assert main(["sample", "--config", "c.yaml", "--solver", "euler", "--nfe", "3", "--outdir", "s"]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "latin1.txt"]
