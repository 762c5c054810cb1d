"""After the first run: a failed pipeline ends its MLflow runs FAILED; a killed Snakemake leaves a lock that
`--unlock` lifts, its half-done jobs are rerun, and its MLflow runs end KILLED when the next invocation starts."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import mlflow
import yaml

from workflow_util import BIN, env, project_copy, run

PROFILE = ["--profile", "default", "--cores", "2"]


def _runs(root, experiment="tiny"):
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=500)


def _edit(root, change) -> None:
    cfg = yaml.safe_load((root / "config" / "config.yaml").read_text())
    change(cfg)
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))


def test_a_failing_pipeline_ends_its_runs_failed(tmp_path):
    root = project_copy(tmp_path)
    (root / "data" / "prompts" / "digits.txt").write_text("a 3 next to a 7\n")   # the stages refuse it at run time
    out = run(root, "snakemake", *PROFILE, "--until", "rdpo")
    assert out.returncode != 0
    assert "names several digits" in (root / "results" / "tiny" / "logs" / "rdpo-nfe3.log").read_text()
    _, runs = _runs(root)
    pipeline = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    assert [r.info.status for r in pipeline] == ["FAILED"]
    assert {r.data.tags["stage"]: r.info.status for r in runs if r.data.tags.get("stage") == "rdpo"} == \
        {"rdpo": "FAILED"}


def test_a_killed_snakemake_unlock_rerun_and_its_runs_end_killed(tmp_path):
    root = project_copy(tmp_path)
    _edit(root, lambda c: c["distill"].update(iterations=4000))   # a distillation long enough to be killed in
    proc = subprocess.Popen([str(BIN / "snakemake"), *PROFILE], cwd=root, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = root / "results" / "tiny" / "tables" / "epd-nfe3.ckpt.json"   # the distillation is under way
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)   # Snakemake and its jobs, as a lost login node would
    proc.wait()
    assert not (root / "results" / "tiny" / "tables" / "epd-nfe3.json").exists()

    locked = run(root, "snakemake", *PROFILE)
    assert locked.returncode != 0 and "--unlock" in locked.stdout
    assert run(root, "snakemake", "--unlock").returncode == 0
    _edit(root, lambda c: c["distill"].update(iterations=10))
    again = run(root, "snakemake", *PROFILE, "--until", "distill")
    assert again.returncode == 0, again.stdout
    assert (root / "results" / "tiny" / "tables" / "epd-nfe3.json").exists()
    _, runs = _runs(root)
    pipelines = sorted((r.info.start_time, r.info.status) for r in runs if r.data.tags.get("stage") == "pipeline")
    assert [s for _, s in pipelines] == ["KILLED", "FINISHED"]
    assert all(r.info.status != "RUNNING" for r in runs)
    killed = {r.data.tags["stage"] for r in runs if r.info.status == "KILLED"}
    assert {"pipeline", "distill"} <= killed
