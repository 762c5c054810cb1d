"""The Snakemake pipeline end to end on the tiny embedded config: a real run, a no-op rerun, `--forcerun` of one
stage rerunning exactly it and its dependents, `--until`, and bad configs refused before any job starts."""
from __future__ import annotations

import csv
import re

import pytest
import yaml

from workflow_util import REPO, TINY, outputs, project_copy, run

PROFILE = ["--profile", "workflow/profiles/default", "--cores", "2"]


def dry_run_jobs(cwd, *args) -> dict[str, int]:
    """`snakemake -n` → {rule: number of jobs} from its job-stats table."""
    out = run(cwd, "snakemake", "-n", "--cores", "1", *args)
    assert out.returncode == 0, out.stdout
    stats = out.stdout.split("Job stats:")[1].split("\n\n")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)}


def test_embedded_default_dag():
    """The embedded default: one job per solver x NFE for sampling and evaluation, run side by side."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    n_tables = len(cfg["distill"]["nfe"])
    n_baselines = len(cfg["baselines"]["solvers"]) * len(cfg["baselines"]["nfe"])
    jobs = dry_run_jobs(REPO, "--forceall")
    assert jobs == {"pipeline_run": 1, "teacher": n_tables, "distill": n_tables, "rdpo": n_tables,
                    "sample_table": 2 * n_tables, "sample_baseline": n_baselines,
                    "evaluate": 2 * n_tables + n_baselines, "report": 1, "all": 1, "total": jobs["total"]}
    assert jobs["total"] == sum(v for k, v in jobs.items() if k != "total")


def test_until_stops_at_the_stage(tmp_path):
    root = project_copy(tmp_path)
    assert dry_run_jobs(root, "--until", "teacher") == {"pipeline_run": 1, "teacher": 1, "total": 2}


@pytest.mark.parametrize("edit, names", [
    (lambda c: c["distill"].update(iterations=-3), ["distill", "iterations", "-3"]),
    (lambda c: c["distill"].update(iters=5), ["distill", "iters"]),
    (lambda c: c["baselines"].update(solvers=["euler", "rk45"]), ["baselines", "solvers", "rk45"]),
    (lambda c: c["sample"].update(seeds="0..9"), ["sample", "seeds", "0..9"]),
])
def test_bad_config_refused_before_any_job(tmp_path, edit, names):
    cfg = yaml.safe_load(TINY.read_text())
    edit(cfg)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    root = project_copy(tmp_path / "project", config=bad)
    out = run(root, "snakemake", *PROFILE)
    assert out.returncode != 0
    assert "Error validating config" in out.stdout, out.stdout
    for name in names:
        assert name in out.stdout, f"{name!r} not named in:\n{out.stdout}"
    assert not (root / "results").exists()


def test_tiny_pipeline_run_noop_forcerun(tmp_path):
    root = project_copy(tmp_path)
    out = run(root, "snakemake", *PROFILE)
    assert out.returncode == 0, out.stdout
    res = root / "results" / "tiny"
    with (res / "report" / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["solver"], r["nfe"]) for r in rows] == [("epd", "3"), ("rdpo", "3"), ("euler", "3")]
    for r in rows:
        assert 0 <= float(r["label_accuracy_mean"]) <= 1 and float(r["realism_mean"]) <= 0
        assert float(r["fd_digits"]) > 0
    for name in ("quality_vs_nfe.png", "curves.png", "grids.png"):
        assert (res / "report" / name).stat().st_size > 1000
    assert "| solver | NFE |" in out.stdout  # the Snakefile prints the summary table at the end

    before = outputs(root)
    again = run(root, "snakemake", *PROFILE)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout, again.stdout
    assert outputs(root) == before

    forced = run(root, "snakemake", *PROFILE, "--forcerun", "distill")
    assert forced.returncode == 0, forced.stdout
    after = outputs(root)
    changed = {p for p in after if after[p] != before.get(p)}
    dependents = re.compile(r"results/tiny/(tables/(epd|rdpo)-nfe3|(samples|eval)/(epd|rdpo)-nfe3/|report/)")
    assert changed and all(dependents.match(p) for p in changed), sorted(changed)
    for group in ("tables/epd-nfe3.json", "tables/rdpo-nfe3.json", "samples/epd-nfe3/", "samples/rdpo-nfe3/",
                  "eval/epd-nfe3/", "eval/rdpo-nfe3/", "report/"):
        assert any(p.startswith(f"results/tiny/{group}") for p in changed), f"{group} was not rerun"
    assert not any(p.startswith(("results/tiny/teacher/", "results/tiny/samples/euler", "results/tiny/eval/euler"))
                   for p in changed)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "config").glob("*.yaml") if p.name != "config.yaml"))
def test_experiment_configs_plan(name):
    """Every experiment config passes the schema and plans its pipeline by --configfile, replacing the default
    (not merged into it: no gmm-digits option reaches another backbone)."""
    cfg = yaml.safe_load((REPO / "config" / name).read_text())
    out = run(REPO, "snakemake", "-n", "-p", "--forceall", "--cores", "1", "--configfile", f"config/{name}")
    assert out.returncode == 0, out.stdout
    teacher = re.search(r"(?m)^Shell command: (epd teacher .*)$", out.stdout)[1]
    assert f"--backbone {cfg['backbone']['name']} " in teacher and "--component-std" not in teacher
    assert f"results/{cfg['experiment']}/report/summary.md" in out.stdout
