"""DVC: dvc.yaml runs the same jobs as the Snakemake rules (the drift test), `dvc repro` runs the tiny pipeline and
then does nothing, and `dvc push` / `dvc pull` move its artifacts through a local remote."""
from __future__ import annotations

import hashlib
import re
import shlex
import shutil

import pytest
import yaml

from workflow_util import REPO, TINY, project_copy, run


def snakemake_jobs(root) -> dict[frozenset, list[str]]:
    """Every job of `snakemake -n -p --forceall`: its outputs → its shell command as tokens."""
    out = run(root, "snakemake", "-n", "-p", "--forceall", "--cores", "1")
    assert out.returncode == 0, out.stdout
    jobs = {}
    for block in re.split(r"(?m)^(?=(?:local)?rule \w+:$)", out.stdout)[1:]:
        rule = block.split()[1].rstrip(":")
        if rule == "all":
            continue
        outs = re.search(r"(?m)^    output: (.*)$", block)[1].split(", ")
        jobs[frozenset(outs)] = shlex.split(re.search(r"(?m)^Shell command: (.*)$", block)[1])
    return jobs


def dvc_stages(root) -> dict[frozenset, list[str]]:
    """Every stage of dvc.yaml as DVC resolves it against config/config.yaml: outputs → command tokens."""
    from dvc.repo import Repo

    with Repo(str(root), uninitialized=True) as repo:
        stages = repo.index.stages
        for stage in stages:  # a folded YAML block keeps a newline before a more-indented line: two commands
            assert "\n" not in stage.cmd, f"{stage.addressing}: the command spans lines: {stage.cmd!r}"
        # persistent outs (RDPO's resume checkpoint) are left out: Snakemake must not declare them, or it would
        # delete them before every run
        return {frozenset(o.def_path for o in stage.outs if not o.persist): shlex.split(stage.cmd)
                for stage in stages}


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


@pytest.mark.parametrize("config", [REPO / "config" / "config.yaml", TINY], ids=["embedded", "tiny"])
def test_dvc_and_snakemake_run_the_same_jobs(tmp_path, config):
    root = project_copy(tmp_path, config=config)
    assert len(snakemake_jobs(root)) > 5
    assert drift(root) == []


def test_dvc_params_come_from_the_config():
    """One source of truth: every parameter DVC tracks is a key of config/config.yaml, no params.yaml."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for entry in (stage.get("do") or stage).get("params", []):
            (path, keys), = entry.items()
            assert path == "config/config.yaml" and all(k in cfg for k in keys), (name, entry)
    assert not (REPO / "params.yaml").exists()


@pytest.mark.parametrize("edit, stage", [
    (lambda c: c["distill"].update(plugin=True), "epd-nfe3.json"),
    (lambda c: c["rdpo"]["reward"].update(realism=2.0, label_logprob=0.0), "rdpo-nfe3.json"),
    (None, "teacher/nfe3"),
])
def test_drift_is_caught(tmp_path, edit, stage):
    """The drift check fails when a config value reaches Snakemake's commands but not DVC's, or the other way."""
    if edit is None:  # dvc.yaml edited to stop following a config value
        root = project_copy(tmp_path)
        text = (root / "dvc.yaml").read_text()
        (root / "dvc.yaml").write_text(text.replace("--guidance ${backbone.options.guidance}", "--guidance 2.0", 1))
    else:  # a config value that dvc.yaml spells out for the embedded default's keys
        cfg = yaml.safe_load(TINY.read_text())
        edit(cfg)
        (tmp_path / "edited.yaml").write_text(yaml.safe_dump(cfg))
        root = project_copy(tmp_path / "p", config=tmp_path / "edited.yaml")
    problems = drift(root)
    assert problems and any(stage in p for p in problems), problems


def digests(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "results").rglob("*")) if p.is_file()}


def test_dvc_repro_noop_push_pull(tmp_path):
    root = project_copy(tmp_path / "project")
    assert run(root, "dvc", "init", "--no-scm", "-q").returncode == 0
    first = run(root, "dvc", "repro")
    assert first.returncode == 0, first.stdout
    summary = (root / "results" / "tiny" / "report" / "summary.md").read_text()
    assert "| epd | 3 |" in summary and "| rdpo | 3 |" in summary and "| euler | 3 |" in summary

    made = digests(root)
    again = run(root, "dvc", "repro")
    assert again.returncode == 0 and "up to date" in again.stdout and "Running stage" not in again.stdout, again.stdout
    assert digests(root) == made

    remote = tmp_path / "remote"
    assert run(root, "dvc", "remote", "add", "-d", "local", str(remote)).returncode == 0
    pushed = run(root, "dvc", "push")
    assert pushed.returncode == 0, pushed.stdout
    assert sum(1 for p in remote.rglob("*") if p.is_file()) > 10
    # a fresh checkout: no cache, no artifacts; pull brings back the trajectories, tables and samples
    shutil.rmtree(root / ".dvc" / "cache")
    for sub in ("teacher", "tables", "samples", "eval"):
        shutil.rmtree(root / "results" / "tiny" / sub)
    pulled = run(root, "dvc", "pull")
    assert pulled.returncode == 0, pulled.stdout
    back = digests(root)
    assert {k: v for k, v in made.items() if k in back} == back
    for key in ("teacher/nfe3/manifest.json", "tables/epd-nfe3.safetensors", "tables/rdpo-nfe3.json",
                "tables/rdpo-nfe3.ckpt.safetensors",
                "samples/euler-nfe3/samples.csv", "eval/epd-nfe3/summary.json"):
        assert f"results/tiny/{key}" in back
    status = run(root, "dvc", "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
