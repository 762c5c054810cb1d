"""The Snakemake pipeline end to end on the tiny embedded config: `snakemake --profile default` verbatim, a no-op
rerun, `--forcerun` of one stage rerunning exactly it and its dependents, a changed config value rerunning exactly
the stages that read it, `--until`, bad configs refused before any job starts, and the experiment configs' plans."""
from __future__ import annotations

import csv
import re

import pytest
import yaml

from workflow_util import REPO, SHARDED, TINY, outputs, project_copy, run

PROFILE = ["--profile", "default", "--cores", "2"]


def dry_run_jobs(cwd, *args) -> dict[str, int]:
    """`snakemake -n` → {rule: number of jobs} from its job-stats table."""
    out = run(cwd, "snakemake", "-n", "--cores", "1", *args)
    assert out.returncode == 0, out.stdout
    if "Nothing to be done" in out.stdout:
        return {}
    stats = out.stdout.split("Job stats:")[1].split("\n\n")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)}


def test_embedded_default_dag():
    """The embedded default: one job per solver x NFE for sampling and evaluation, run side by side, and the
    reference (sampled and evaluated once)."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["pipeline"]
    n_tables, n_baselines = len(cfg["nfe"]), len(cfg["baselines"]) * len(cfg["baseline_nfe"])
    kinds = 2 + len(cfg.get("peers", []))   # epd, rdpo and the learned peers (ld3), each at every nfe
    jobs = dry_run_jobs(REPO, "--forceall")
    assert cfg.get("peers") == ["ld3"]
    assert jobs == {"teacher": n_tables, "distill": n_tables, "ld3": n_tables, "rdpo": n_tables,
                    "sample_table": kinds * n_tables, "sample_baseline": n_baselines, "reference": 1,
                    "evaluate": kinds * n_tables + n_baselines + 1, "report": 1, "all": 1,
                    "total": jobs["total"]}
    assert jobs["total"] == sum(v for k, v in jobs.items() if k != "total")


def test_until_stops_at_the_stage(tmp_path):
    root = project_copy(tmp_path)
    assert dry_run_jobs(root, "--until", "teacher") == {"teacher": 1, "total": 1}


@pytest.mark.parametrize("edit, names", [
    (lambda c: c["distill"].update(iterations=-3), ["distill.iterations", "greater than or equal to 1", "-3"]),
    (lambda c: c["distill"].update(iters=5), ["distill.iters", "unknown key"]),
    (lambda c: c["pipeline"].update(baselines=["euler", "rk45"]), ["pipeline.baselines", "rk45"]),
    (lambda c: c["sample"].update(seeds="0..9"), ["sample.seeds", "0..9"]),
    (lambda c: c["sample"].update(seeds="5-1"), ["sample", "seed range '5-1' runs backwards"]),
    (lambda c: c["rdpo"].update(reward={"realsim": 1.0}), ["rdpo.reward", "realsim"]),
    (lambda c: c["schedule"].update(name="flow_match"), ["schedule 'flow_match' does not fit backbone 'gmm-digits'"]),
])
def test_bad_config_refused_before_any_job(tmp_path, edit, names):
    cfg = yaml.safe_load(TINY.read_text())
    edit(cfg)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    root = project_copy(tmp_path / "project", config=bad)
    out = run(root, "snakemake", *PROFILE)
    assert out.returncode != 0
    for name in names:
        assert name in out.stdout, f"{name!r} not named in:\n{out.stdout}"
    assert not (root / "results").exists()


def test_overrides_on_the_command_line_are_refused(tmp_path):
    """The stages read the config file itself, so a --config KEY=VALUE override would not reach them."""
    root = project_copy(tmp_path)
    out = run(root, "snakemake", "-n", "--cores", "1", "--config", "experiment=other")
    assert out.returncode != 0 and "not --config KEY=VALUE" in out.stdout


def test_tiny_pipeline_run_noop_forcerun_and_config_change(tmp_path):
    root = project_copy(tmp_path)
    out = run(root, "snakemake", *PROFILE)
    assert out.returncode == 0, out.stdout
    res = root / "results" / "tiny"
    with (res / "report" / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["solver"], r["nfe"]) for r in rows] == [("epd", "3"), ("rdpo", "3"), ("ld3", "3"), ("euler", "3"),
                                                        ("reference", "")]
    for r in rows:
        assert 0 <= float(r["label_accuracy_mean"]) <= 1 and float(r["realism_mean"]) <= 0
        assert float(r["fd_digits"]) > 0
    # every solver's accuracy against the reference of the same seeds; the reference's own row is exact
    assert all(float(r["rms_to_reference_mean"]) > 0.01 and float(r["fd_to_reference"]) > 1e-4 for r in rows[:4])
    assert float(rows[4]["rms_to_reference_mean"]) == 0 and float(rows[4]["mode_agreement_mean"]) == 1
    assert "| LD3 (iPNDM) | 3 |" in out.stdout   # the peer's row named by its solver
    assert "Reference: DPM-Solver++(3M), 64 steps" in out.stdout
    for name in ("quality_vs_nfe.png", "curves.png", "grids.png"):
        assert (res / "report" / name).stat().st_size > 1000
    assert "| solver | NFE |" in out.stdout  # the Snakefile prints the summary table at the end
    for job in ("teacher-nfe3", "distill-nfe3", "ld3-nfe3", "rdpo-nfe3", "sample-euler-nfe3", "evaluate-ld3-nfe3",
                "report"):
        assert (res / "logs" / f"{job}.log").stat().st_size > 0, job   # every job's output in its log

    # Snakemake's own HTML report of the finished run: the summary, the plots and the grids
    report = run(root, "snakemake", "--report", "report.html")
    assert report.returncode == 0, report.stdout
    html = (root / "report.html").read_text()
    for name in ("summary.csv", "quality_vs_nfe.png", "curves.png", "grids.png"):
        assert name in html, name

    before = outputs(root)
    again = run(root, "snakemake", *PROFILE)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout, again.stdout
    assert outputs(root) == before

    forced = run(root, "snakemake", *PROFILE, "--forcerun", "distill")
    assert forced.returncode == 0, forced.stdout
    after = outputs(root)
    changed = {p for p in after if after[p] != before.get(p)}
    # (and this invocation's MLflow pipeline run)
    dependents = re.compile(r"results/tiny/(tables/(epd|rdpo)-nfe3|(samples|eval)/(epd|rdpo)-nfe3/|report/|logs/|"
                            r"pipeline-run\.json)")
    assert changed and all(dependents.match(p) for p in changed), sorted(changed)
    for group in ("tables/epd-nfe3.json", "tables/rdpo-nfe3.json", "samples/epd-nfe3/", "samples/rdpo-nfe3/",
                  "eval/epd-nfe3/", "eval/rdpo-nfe3/", "report/"):
        assert any(p.startswith(f"results/tiny/{group}") for p in changed), f"{group} was not rerun"
    assert not any(p.startswith(("results/tiny/teacher/", "results/tiny/samples/euler", "results/tiny/eval/euler"))
                   for p in changed)

    # One config value: exactly the stages that read its section, and what depends on them.
    cfg = yaml.safe_load((root / "config" / "config.yaml").read_text())
    cfg["rdpo"]["ppo"]["kl_coef"] = 0.5
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert dry_run_jobs(root) == {"rdpo": 1, "sample_table": 1, "evaluate": 1, "report": 1, "all": 1, "total": 5}
    cfg["sample"]["batch"] = 8
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert dry_run_jobs(root) == {"rdpo": 1, "sample_table": 3, "sample_baseline": 1, "reference": 1, "evaluate": 5,
                                  "report": 1, "all": 1, "total": 13}
    cfg["ld3"]["lr"] = 0.02   # the peer's section: its grid and what depends on it, nothing else
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert dry_run_jobs(root) == {"rdpo": 1, "ld3": 1, "sample_table": 3, "sample_baseline": 1, "reference": 1,
                                  "evaluate": 5, "report": 1, "all": 1, "total": 14}

    # Fewer RDPO steps than the finished run: RDPO and what depends on it rerun, and the table is trained for the
    # lower count (the longer run's checkpoint kept aside), not refused after Snakemake deleted the outputs.
    cfg["rdpo"]["ppo"]["steps"] = 1
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    fewer = run(root, "snakemake", *PROFILE)
    assert fewer.returncode == 0, fewer.stdout
    with open(res / "tables" / "rdpo-nfe3.metrics.csv") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1"]
    assert len(list((res / "tables").glob("rdpo-nfe3.ckpt-*-step2.safetensors"))) == 1


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "config").glob("*.yaml") if p.name != "config.yaml"))
def test_experiment_configs_plan(name):
    """Every experiment config passes the checks and plans its pipeline by --configfile, replacing the default (not
    merged into it: no gmm-digits option reaches another backbone); every command reads that file."""
    cfg = yaml.safe_load((REPO / "config" / name).read_text())
    out = run(REPO, "snakemake", "-n", "-p", "--forceall", "--cores", "1", "--configfile", f"config/{name}")
    assert out.returncode == 0, out.stdout
    teacher = re.search(r"(?m)^Shell command: (epd teacher .*)$", out.stdout)[1]
    assert f"--config config/{name} " in teacher
    assert f"results/{cfg['experiment']}/report/summary.md" in out.stdout


def test_sharded_teacher_gathers_and_a_bad_shard_stops_what_depends_on_it(tmp_path):
    """One job per shard of seeds, then a gather job; a truncated shard makes the gather fail naming it, and the
    distillation that reads the teacher does not run."""
    root = project_copy(tmp_path, config=SHARDED)
    out = run(root, "snakemake", *PROFILE, "--until", "teacher")
    assert out.returncode == 0, out.stdout
    res = root / "results" / "tiny" / "teacher"
    assert sorted(p.name for p in (res / "nfe3.shards").iterdir()) == ["0", "1"]
    assert sorted(p.name for p in (res / "nfe3").glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    (res / "nfe3.shards" / "1" / "shard-00001.safetensors").write_bytes(b"truncated")
    out = run(root, "snakemake", *PROFILE, "--forcerun", "teacher", "--until", "distill")
    assert out.returncode != 0
    log = (root / "results" / "tiny" / "logs" / "teacher-nfe3.log").read_text()
    assert "teacher shard 1 of 2 is not usable" in log and "shard-00001.safetensors" in log
    assert not (root / "results" / "tiny" / "tables").exists()


def test_a_start_table_replaces_teacher_and_distillation(tmp_path):
    """distill.start_tables names a finished table (e.g. a published one) for an NFE: no teacher job for it, the
    distill job takes that table, and RDPO, sampling and evaluation follow as for a distilled one."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["pipeline"].update(nfe=[3, 5], peers=[])   # an LD3 peer at NFE 5 would still need that NFE's teacher
    cfg["distill"]["start_tables"] = {5: str(REPO / "data" / "tables" / "epd-time_uniform-nfe5.json")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    root = project_copy(tmp_path / "p", config=tmp_path / "c.yaml")
    jobs = dry_run_jobs(root)
    assert jobs["teacher"] == 1 and jobs["distill"] == 2 and jobs["rdpo"] == 2
    out = run(root, "snakemake", *PROFILE, "--until", "distill")
    assert out.returncode == 0, out.stdout
    tables = root / "results" / "tiny" / "tables"
    assert (tables / "epd-nfe5.json").exists() and not (root / "results" / "tiny" / "teacher" / "nfe5").exists()
