"""MLflow tracking: stage runs nested under a pipeline run and comparable by solver, artifacts beside the SQLite
file, nothing at all when tracking is off, clear errors for a bad setup, and 8 concurrent writers losing nothing."""
import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from epd import tracking
from epd.cli import main

mlflow = pytest.importorskip("mlflow")

STORE = "sqlite:///mlruns/mlflow.db"   # the workflow default, relative to the project (here: tmp_path)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder as working directory, with no tracking settings leaking in from the environment."""
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """A freshly initialised store, made once: mlflow's table creation takes seconds (the race test makes its own)."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    tracking._Store(f"sqlite:///{db}")
    return db


@pytest.fixture
def tracked(project, empty_store):
    """The project with an (empty) store at the workflow's default place."""
    (project / "mlruns").mkdir()
    shutil.copy(empty_store, project / "mlruns" / "mlflow.db")
    return project


def _client(project: Path):
    return mlflow.MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")


def _children(client, info: dict) -> list:
    return client.search_runs([info["experiment_id"]], f"tags.`mlflow.parentRunId` = '{info['run_id']}'")


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    return {f.path for f in client.list_artifacts(run_id, path)}


def test_pipeline_nests_stage_runs_comparable_by_solver(tracked):
    project = tracked
    (project / "config.yaml").write_text("experiment: digits-test\ntracking: {uri: 'sqlite:///mlruns/mlflow.db'}\n"
                                         "pipeline: {nfe: [5]}\ndistill: {lr: 0.1}\n")
    assert main(["pipeline-run", "start", "--out", "run.json", "--config", "config.yaml"]) == 0
    info = json.loads((project / "run.json").read_text())
    assert info["tracking_uri"] == f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"   # made absolute
    assert info["experiment"] == "digits-test"
    parent = ["--parent-run", "run.json", "--no-progress"]
    assert main(["teacher", "--schedule", "time_uniform", "--nfe", "5", "--seeds", "0-31", "--inserted-steps", "3",
                 "--out", "teacher", *parent]) == 0
    assert main(["distill", "--teacher", "teacher", "--nfe", "5", "--iterations", "12", "--batch", "8",
                 "--checkpoint-every", "5", "--out", "tables/epd", *parent]) == 0
    assert main(["sample", "--table", "tables/epd.json", "--seeds", "0-7", "--grid", "--outdir", "s/epd", *parent]) == 0
    assert main(["sample", "--solver", "dpmpp_2m", "--nfe", "5", "--schedule", "time_uniform", "--seeds", "0-7",
                 "--grid", "--outdir", "s/dpmpp", *parent]) == 0
    assert main(["sample", "--table", "missing.json", "--outdir", "s/bad", *parent]) == 2   # a failed stage
    assert main(["pipeline-run", "end", "run.json"]) == 0

    client = _client(project)
    pipeline = client.get_run(info["run_id"])
    assert pipeline.info.status == "FINISHED" and pipeline.info.run_name == "digits-test pipeline"
    assert pipeline.data.params["distill.lr"] == "0.1" and pipeline.data.params["pipeline.nfe"] == "[5]"
    assert pipeline.data.params["distill.iterations"] == "1000"   # every key, defaults included
    assert _artifacts(client, info["run_id"]) == {"config.yaml"}
    # Artifacts beside the database, not in the working directory's ./mlruns/<id> default.
    assert pipeline.info.artifact_uri.startswith((project / "mlruns" / "artifacts" / "digits-test").as_uri())

    runs = _children(client, info)
    by_name = {r.info.run_name: r for r in runs}
    assert sorted(by_name) == ["distill epd", "sample bad", "sample dpmpp", "sample epd", "teacher teacher"]
    assert all(r.info.experiment_id == info["experiment_id"] for r in runs)
    assert by_name["sample bad"].info.status == "FAILED"
    assert all(r.info.status == "FINISHED" for n, r in by_name.items() if n != "sample bad")

    teacher = by_name["teacher teacher"].data
    assert teacher.params["teacher.inserted_steps"] == "3" and teacher.params["teacher.seeds"] == "0-31"
    assert teacher.params["schedule.name"] == "time_uniform" and teacher.params["backbone.name"] == "gmm-digits"
    assert teacher.metrics["num_samples"] == 32

    # The distillation loss curve: every iteration, equal to OUT.loss.csv; table and plot as artifacts.
    distill = by_name["distill epd"]
    history = sorted((m.step, m.value) for m in client.get_metric_history(distill.info.run_id, "loss"))
    with open(project / "tables" / "epd.loss.csv") as f:
        expected = [(int(r["iteration"]), float(r["loss"])) for r in csv.DictReader(f)]
    assert [s for s, _ in history] == list(range(1, 13))
    assert [v for _, v in history] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert distill.data.metrics["final_loss"] == pytest.approx(expected[-1][1], rel=1e-6)
    assert _artifacts(client, distill.info.run_id, "table") == {
        f"table/epd{s}" for s in (".json", ".safetensors", ".loss.csv", ".loss.png")}
    assert distill.data.tags["solver"] == "epd" and distill.data.tags["nfe"] == "5"

    # Runs of different solvers side by side: the same columns, one row per solver.
    done = client.search_runs([info["experiment_id"]], "tags.stage = 'sample' and attributes.status = 'FINISHED'")
    side = {r.data.tags["solver"]: (r.data.tags["nfe"], r.data.tags["schedule"], r.data.metrics["num_samples"],
                                    r.data.params["sample.seeds"]) for r in done}
    assert side == {"epd": ("5", "time_uniform", 8, "0-7"), "dpmpp_2m": ("5", "time_uniform", 8, "0-7")}
    for name in ("sample epd", "sample dpmpp"):
        assert _artifacts(client, by_name[name].info.run_id) == {"grid.png"}


def test_untracked_stage_writes_nothing_and_never_imports_mlflow(project):
    code = textwrap.dedent("""
        import sys
        from epd.cli import main
        assert main(["sample", "--seeds", "0-3", "--grid", "--outdir", "out", "--no-progress"]) == 0
        assert "mlflow" not in sys.modules, "mlflow imported with tracking off"
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    subprocess.run([sys.executable, "-c", code], cwd=project, env={**env, "OMP_NUM_THREADS": "1"}, check=True)
    assert (project / "out" / "grid.png").exists() and not (project / "mlruns").exists()
    assert tracking.active_run_id() is None
    tracking.log_metrics({"x": 1.0})   # no run: no-ops
    tracking.log_params({"x": 1})
    tracking.log_artifact("no/such/file")


def test_untracked_pipeline_runs_its_stages_untracked(project):
    assert main(["pipeline-run", "start", "--out", "run.json"]) == 0
    assert json.loads((project / "run.json").read_text())["tracking_uri"] is None
    assert main(["sample", "--seeds", "0-1", "--grid", "--outdir", "out", "--parent-run", "run.json",
                 "--no-progress"]) == 0
    assert main(["pipeline-run", "end", "run.json"]) == 0
    assert not (project / "mlruns").exists()


def test_stage_without_pipeline_uses_env_and_experiment(tracked, monkeypatch):
    project = tracked
    monkeypatch.setenv("MLFLOW_TRACKING_URI", STORE)
    assert main(["sample", "--seeds", "0-1", "--grid", "--outdir", "out", "--experiment", "solo", "--run-name", "mine",
                 "--no-progress"]) == 0
    client = _client(project)
    exp = client.get_experiment_by_name("solo")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "mine" and "mlflow.parentRunId" not in run.data.tags
    assert run.data.tags["stage"] == "sample" and run.data.tags["epd.command"].startswith("epd sample --seeds 0-1")
    assert run.data.params["outdir"] == "out"


@pytest.mark.parametrize("extra, message", [
    (["--parent-run", "bad.json"], "not a pipeline-run file"),
    (["--parent-run", "run.json", "--experiment", "other"], "differs from the pipeline run's experiment"),
    (["--parent-run", "run.json", "--tracking-uri", "sqlite:///elsewhere.db"], "differs from the pipeline run's store"),
])
def test_bad_tracking_setup_is_refused_before_the_stage_runs(tracked, capsys, extra, message):
    project = tracked
    assert main(["pipeline-run", "start", "--out", "run.json", "--tracking-uri", STORE]) == 0
    (project / "bad.json").write_text('{"format": "epd-table"}')
    assert main(["sample", "--seeds", "0-1", "--grid", "--outdir", "out", "--no-progress", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (project / "out").exists()


def test_params_are_write_once(tracked):
    project = tracked
    with tracking.stage_run("unit", uri=STORE, params={"a": {"b": 1}}):
        tracking.log_params({"a.b": 1, "c": [1, 2]})          # the same value again: fine
        with pytest.raises(tracking.TrackingError, match="'a.b' was logged as '1'"):
            tracking.log_params({"a": {"b": 2}})
    (run,) = _client(project).search_runs([_client(project).get_experiment_by_name("epd").experiment_id])
    assert run.data.params == {"a.b": "1", "c": "[1, 2]"} and run.info.status == "FINISHED"


WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from epd import tracking
    import mlflow  # imported before the barrier, so the 8 processes hit the store together

    i, ready = int(sys.argv[1]), Path(sys.argv[2])
    (ready / str(i)).touch()
    while len(list(ready.iterdir())) < 8:
        time.sleep(0.005)
    art = Path(f"art-{i}.txt")
    art.write_text(f"writer {i}")
    with tracking.stage_run("writer", uri="sqlite:///mlruns/mlflow.db", experiment="race", run_name=f"w{i}",
                            params={"writer": i}, tags={"solver": f"s{i % 2}"}):
        for step in range(20):
            tracking.log_metrics({"value": i * 100 + step}, step=step)
        tracking.log_metric_history("curve", [float(i)] * 50, range(50))
        tracking.set_tags({"done": "yes"})
        tracking.log_artifact(art)
""")


def test_eight_concurrent_writers_lose_nothing(project):
    """8 processes open a fresh SQLite store at the same moment, create the same experiment and interleave writes
    (plain mlflow loses 7 of 8 runs here: its table creation races)."""
    (project / "ready").mkdir()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(i), "ready"], cwd=project, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(8)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, "\n".join(outputs)

    client = _client(project)
    assert [e.name for e in client.search_experiments()].count("race") == 1
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id], max_results=100)
    assert sorted(r.info.run_name for r in runs) == [f"w{i}" for i in range(8)]
    for run in runs:
        i = int(run.data.params["writer"])
        assert run.info.status == "FINISHED" and run.data.tags["done"] == "yes"
        assert run.data.tags["solver"] == f"s{i % 2}"
        values = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "value"))
        assert values == [(s, i * 100 + s) for s in range(20)]
        assert len(client.get_metric_history(run.info.run_id, "curve")) == 50
        local = Path(client.download_artifacts(run.info.run_id, f"art-{i}.txt", str(project / f"dl-{i}")))
        assert local.read_text() == f"writer {i}"


def test_resumed_distillation_logs_the_whole_loss_curve(tracked):
    """A distillation cut after a checkpoint and rerun: the second run's curve starts at iteration 1, not at the
    resume point, and equals OUT.loss.csv."""
    from epd.distill import DistillConfig, distill
    from epd.teacher import TeacherConfig, write_teacher

    project = tracked
    write_teacher(TeacherConfig(num_steps=3, inserted_steps=1, seeds="0-15", batch_size=16), project / "t",
                  progress=False)
    cfg = DistillConfig(nfe=3, iterations=12, batch=8, checkpoint_every=5)
    with tracking.stage_run("distill", uri=STORE, run_name="cut") as cut:
        assert distill(project / "t", project / "d", cfg, progress=False, stop_after=7) is None
    with tracking.stage_run("distill", uri=STORE, run_name="resumed") as resumed:
        distill(project / "t", project / "d", cfg, progress=False)
    client = _client(project)
    assert [m.step for m in client.get_metric_history(cut, "loss")] == [1, 2, 3, 4, 5]   # up to the checkpoint
    history = sorted((m.step, m.value) for m in client.get_metric_history(resumed, "loss"))
    with open(project / "d.loss.csv") as f:
        expected = [(int(r["iteration"]), float(r["loss"])) for r in csv.DictReader(f)]
    assert [s for s, _ in history] == list(range(1, 13))
    assert [v for _, v in history] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_sigterm_closes_the_run_as_killed(tracked):
    """scancel / a SLURM time limit sends SIGTERM: the run must not stay RUNNING forever."""
    code = textwrap.dedent("""
        import time
        from epd import tracking
        with tracking.stage_run("long", uri="sqlite:///mlruns/mlflow.db", run_name="long"):
            print("started", flush=True)
            time.sleep(120)
    """)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tracked, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    proc.terminate()
    assert proc.wait(timeout=60) == 143
    client = _client(tracked)
    (run,) = client.search_runs([client.get_experiment_by_name("epd").experiment_id])
    assert run.info.run_name == "long" and run.info.status == "KILLED"


def test_a_finished_or_missing_pipeline_run_is_not_a_parent(tracked):
    """Stages nest under a pipeline run only while it runs: after it ended (or before any, as under `dvc repro`)
    they are runs of their own, never children of a stale pipeline run with another config."""
    project = tracked
    assert main(["sample", "--seeds", "0-1", "--grid", "--outdir", "a", "--parent-run", "none.json",
                 "--tracking-uri", STORE, "--no-progress"]) == 0
    assert main(["pipeline-run", "start", "--out", "run.json", "--tracking-uri", STORE]) == 0
    assert main(["pipeline-run", "end", "run.json"]) == 0
    assert main(["sample", "--seeds", "0-1", "--grid", "--outdir", "b", "--parent-run", "run.json",
                 "--no-progress"]) == 0
    client = _client(project)
    runs = client.search_runs([client.get_experiment_by_name("epd").experiment_id], "tags.stage = 'sample'")
    assert len(runs) == 2 and all("mlflow.parentRunId" not in r.data.tags for r in runs)
    assert all(r.info.status == "FINISHED" for r in runs)


KILLED_STAGE = textwrap.dedent("""
    import os, signal, sys
    from epd import tracking
    with tracking.stage_run("sample", parent=sys.argv[1], run_name="dies", out="out"):
        os.kill(os.getpid(), signal.SIGKILL)   # kill -9: nothing closes the run
""")


def test_runs_of_a_killed_pipeline_are_closed_killed_on_the_next_start(tracked):
    project = tracked
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "OMP_NUM_THREADS": "1"}
    assert main(["pipeline-run", "start", "--out", "results/x/run.json", "--tracking-uri", STORE]) == 0
    first = json.loads((project / "results/x/run.json").read_text())
    proc = subprocess.run([sys.executable, "-c", KILLED_STAGE, "results/x/run.json"], cwd=project, env=env)
    assert proc.returncode == -9
    client = _client(project)
    assert client.get_run(first["run_id"]).info.status == "RUNNING"   # the pipeline died too (never ended)
    (dead,) = _children(client, first)
    assert dead.info.status == "RUNNING"

    # The next invocation: the dead pipeline run and its dead stage run end KILLED; a new pipeline run starts.
    assert main(["pipeline-run", "start", "--out", "results/x/run.json", "--tracking-uri", STORE]) == 0
    second = json.loads((project / "results/x/run.json").read_text())
    assert second["run_id"] != first["run_id"]
    assert client.get_run(first["run_id"]).info.status == "KILLED"
    assert client.get_run(dead.info.run_id).info.status == "KILLED"
    assert client.get_run(second["run_id"]).info.status == "RUNNING"


def test_a_killed_stage_run_is_closed_when_its_output_is_made_again(tracked):
    """Without a pipeline run (a stage run by hand, or under DVC): the rerun of the same output closes the run its
    killed predecessor left RUNNING."""
    project = tracked
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": STORE}
    assert subprocess.run([sys.executable, "-c", KILLED_STAGE, "none.json"], cwd=project, env=env).returncode == -9
    client = _client(project)
    experiment = client.get_experiment_by_name("epd").experiment_id
    (dead,) = client.search_runs([experiment])
    assert dead.info.status == "RUNNING"
    assert main(["sample", "--seeds", "0-1", "--grid", "--outdir", "out", "--tracking-uri", STORE,
                 "--no-progress"]) == 0
    assert client.get_run(dead.info.run_id).info.status == "KILLED"
    assert sorted(r.info.status for r in client.search_runs([experiment])) == ["FINISHED", "KILLED"]
