"""DVC: dvc.yaml runs the same jobs as the Snakemake rules for every shipped config (the drift test), its params are
the config sections each command reads, `dvc repro` runs the tiny pipeline and then does nothing, `dvc push` /
`dvc pull` move its artifacts, and Snakemake and DVC agree: after either one ran, the other reruns nothing, and a
changed config value makes either rerun exactly the stages that read it."""
from __future__ import annotations

import hashlib
import re
import shlex
import shutil

import pytest
import yaml

from epd.config import STAGE_SECTIONS
from workflow_util import REPO, SHARDED, TINY, outputs, project_copy, run

CONFIGS = [*sorted((REPO / "config").glob("*.yaml")), TINY, SHARDED]


def snakemake_jobs(root) -> dict[frozenset, list[str]]:
    """Every job of `snakemake -n -p --forceall`: its outputs → its shell command as tokens (without the log
    redirection, which DVC does not have). A sharded stage is several jobs in Snakemake (one per shard of seeds, then a
    gather) and one in DVC: the shard jobs are left out and the gather is its unsharded command plus `--gather DIR`,
    which is dropped here (test_shards shows the two make the same bytes)."""
    out = run(root, "snakemake", "-n", "-p", "--forceall", "--cores", "1")
    assert out.returncode == 0, out.stdout
    jobs = {}
    for block in re.split(r"(?m)^(?=(?:local)?rule \w+:$)", out.stdout)[1:]:
        rule = block.split()[1].rstrip(":")
        if rule == "all":
            continue
        outs = re.search(r"(?m)^    output: (.*)$", block)[1].split(", ")
        cmd = shlex.split(re.search(r"(?m)^Shell command: (.*)$", block)[1].split(" > results/")[0])
        if any(".shards/" in o for o in outs):
            continue
        if "--gather" in cmd:
            i = cmd.index("--gather")
            cmd = cmd[:i] + cmd[i + 2:]
        jobs[frozenset(outs)] = cmd
    return jobs


def dvc_stages(root) -> dict[frozenset, list[str]]:
    """Every stage of dvc.yaml as DVC resolves it against config/config.yaml: outputs → command tokens."""
    from dvc.repo import Repo

    with Repo(str(root), uninitialized=True) as repo:
        # persistent outs (RDPO's resume checkpoint) are left out: Snakemake must not declare them, or it would
        # delete them before every run
        return {frozenset(o.def_path for o in stage.outs if not o.persist): shlex.split(stage.cmd)
                for stage in repo.index.stages}


def drift(root) -> list[str]:
    """How dvc.yaml and the Snakemake rules disagree for the config in ``root`` (empty: they agree)."""
    smk, dvc = snakemake_jobs(root), dvc_stages(root)
    problems = [f"only Snakemake makes {sorted(k)}" for k in smk.keys() - dvc.keys()]
    problems += [f"only DVC makes {sorted(k)}" for k in dvc.keys() - smk.keys()]
    for outs in smk.keys() & dvc.keys():
        if smk[outs] != dvc[outs]:
            diff = [(a, b) for a, b in zip(smk[outs], dvc[outs]) if a != b] or "different lengths"
            problems.append(f"{sorted(outs)[0]}: commands differ, (snakemake, dvc) = {diff}")
    return problems


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_dvc_and_snakemake_run_the_same_jobs(tmp_path, config):
    """For every shipped config made DVC's config (README: the DVC switch), the jobs are the same, command for
    command."""
    root = project_copy(tmp_path, config=config)
    assert len(snakemake_jobs(root)) > 5
    assert drift(root) == []


def test_drift_is_caught(tmp_path):
    root = project_copy(tmp_path)
    text = (root / "dvc.yaml").read_text()
    (root / "dvc.yaml").write_text(text.replace("--nfe ${item} --teacher", "--nfe 5 --teacher", 1))
    problems = drift(root)
    assert problems and any("epd-nfe3.json" in p for p in problems), problems


def test_dvc_params_are_the_sections_each_command_reads():
    """One source of truth: each stage's params are the config sections its `epd` command reads."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert yaml.safe_load((REPO / "dvc.yaml").read_text())["vars"] == ["config/config.yaml"]
    for name, stage in stages.items():
        body = stage.get("do") or stage
        command = body["cmd"].split()[1]
        (entry,) = body.get("params", [{"config/config.yaml": []}])
        assert list(entry) == ["config/config.yaml"]
        assert tuple(entry["config/config.yaml"]) == STAGE_SECTIONS[command], name
    assert not (REPO / "params.yaml").exists()


def digests(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "results").rglob("*")) if p.is_file() and "/logs/" not in str(p)}


def _ran(out) -> list[str]:
    return sorted(re.findall(r"Running stage '([^']+)'", out.stdout))


def _set(root, edit) -> None:
    cfg = yaml.safe_load((root / "config" / "config.yaml").read_text())
    edit(cfg)
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))


RDPO_AND_AFTER = ["evaluate_table@rdpo-3", "rdpo@3", "report", "sample_table@rdpo-3"]


def test_dvc_repro_noop_push_pull_and_snakemake_agrees(tmp_path):
    root = project_copy(tmp_path / "project")
    assert run(root, "dvc", "init", "--no-scm", "-q").returncode == 0
    first = run(root, "dvc", "repro")
    assert first.returncode == 0, first.stdout
    summary = (root / "results" / "tiny" / "report" / "summary.md").read_text()
    assert "| epd | 3 |" in summary and "| rdpo | 3 |" in summary and "| euler | 3 |" in summary and \
        "| reference | — |" in summary

    made = digests(root)
    again = run(root, "dvc", "repro")
    assert again.returncode == 0 and "up to date" in again.stdout and "Running stage" not in again.stdout, again.stdout
    assert digests(root) == made

    # DVC, then Snakemake: nothing to do; then one value changed: exactly the stages that read it, in both.
    before = outputs(root)
    snake = run(root, "snakemake", "--profile", "default", "-n")
    assert snake.returncode == 0 and "Nothing to be done" in snake.stdout, snake.stdout
    _set(root, lambda c: c["rdpo"]["ppo"].update(kl_coef=0.5))
    snake = run(root, "snakemake", "--profile", "default", "-n")
    assert re.findall(r"(?m)^rule (\w+):", snake.stdout) == ["rdpo", "sample_table", "evaluate"] or \
        sorted(re.findall(r"(?m)^(?:local)?rule (\w+):", snake.stdout)) == ["all", "evaluate", "rdpo", "report",
                                                                             "sample_table"], snake.stdout
    repro = run(root, "dvc", "repro")
    assert _ran(repro) == RDPO_AND_AFTER, repro.stdout
    assert outputs(root)["results/tiny/tables/epd-nfe3.json"] == before["results/tiny/tables/epd-nfe3.json"]
    snake = run(root, "snakemake", "--profile", "default", "-n")
    assert "Nothing to be done" in snake.stdout, snake.stdout

    remote = tmp_path / "remote"
    assert run(root, "dvc", "remote", "add", "-d", "local", str(remote)).returncode == 0
    pushed = run(root, "dvc", "push")
    assert pushed.returncode == 0, pushed.stdout
    assert sum(1 for p in remote.rglob("*") if p.is_file()) > 10
    # a fresh checkout: no cache, no artifacts; pull brings back the trajectories, tables and samples
    made = digests(root)
    shutil.rmtree(root / ".dvc" / "cache")
    for sub in ("teacher", "tables", "samples", "eval"):
        shutil.rmtree(root / "results" / "tiny" / sub)
    pulled = run(root, "dvc", "pull")
    assert pulled.returncode == 0, pulled.stdout
    back = digests(root)
    assert {k: v for k, v in made.items() if k in back} == back
    for key in ("teacher/nfe3/manifest.json", "tables/epd-nfe3.safetensors", "tables/rdpo-nfe3.json",
                "tables/rdpo-nfe3.ckpt.safetensors", "samples/euler-nfe3/samples.csv", "eval/epd-nfe3/summary.json"):
        assert f"results/tiny/{key}" in back
    status = run(root, "dvc", "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout


def test_snakemake_then_dvc_reruns_nothing_and_then_exactly_the_changed_stages(tmp_path):
    root = project_copy(tmp_path)
    assert run(root, "dvc", "init", "--no-scm", "-q").returncode == 0
    snake = run(root, "snakemake", "--profile", "default", "--cores", "2")
    assert snake.returncode == 0 and "dvc.lock: 15 stages recorded" in snake.stdout, snake.stdout
    status = run(root, "dvc", "status")
    assert "up to date" in status.stdout, status.stdout
    repro = run(root, "dvc", "repro")
    assert "Running stage" not in repro.stdout, repro.stdout
    _set(root, lambda c: c["rdpo"]["ppo"].update(kl_coef=0.5))
    repro = run(root, "dvc", "repro")
    assert _ran(repro) == RDPO_AND_AFTER, repro.stdout
