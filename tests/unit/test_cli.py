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
    out = {}
    for path in (REPO / "workflow" / "rules").glob("*.smk"):
        for m in re.finditer(r'(?ms)^rule (\w+):.*?^    shell:\n((?:        "[^\n]*"\n)+)', path.read_text()):
            out[m[1]] = "".join(re.findall(r'"(.*)"', m[2]))
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
