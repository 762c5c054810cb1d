"""MLflow tracking: every CLI stage is one run, nested under one pipeline run.

Stages call :func:`log_params`, :func:`log_metrics`, :func:`log_metric_history`, :func:`log_artifact` and
:func:`set_tags` unconditionally: they do nothing unless the CLI opened a run with :func:`stage_run`. mlflow is
imported only then, so an untracked ``epd sample`` never pays for it.

Store: any MLflow tracking URI. A relative ``sqlite:///mlruns/mlflow.db`` is made absolute against the working
directory (the project root when Snakemake runs a rule), and experiments created in a SQLite store keep their
artifacts beside the file, in ``mlruns/artifacts/<experiment>/`` (mlflow's default would be ``./mlruns`` of
whichever folder a job happened to run in).

Concurrency: SLURM/Snakemake jobs write one SQLite file at once. Left alone, 7 of 8 processes opening a fresh store
crash (mlflow creates its tables without a lock), two jobs creating the same experiment collide on its unique name,
and a writer that cannot upgrade its read lock gets "database is locked" at once (SQLite's busy timeout does not
cover that case). So every database call goes through :meth:`_Store.call`: an exclusive POSIX lock on
``<db>.lock`` (fcntl locks, which NFS forwards to its server) and retries with backoff for transient errors; an
experiment that a concurrent job has just created is looked up, not created twice.
"""
from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Mapping, Sequence

from .options import Field

try:
    import fcntl
except ImportError:  # Windows: no POSIX locks; SQLite's own locking and the retries remain
    fcntl = None

PIPELINE_FORMAT = "epd-pipeline-run"
DEFAULT_EXPERIMENT = "epd"
STATUSES = ("FINISHED", "FAILED", "KILLED")
_RETRIES = 10                 # backoff 0.1 s · 2^i, capped at 5 s: ~25 s in all before an error is raised
_BATCH = {"metrics": 1000, "params": 100, "tags": 100}   # MLflow's log_batch limits
_MAX_VALUE = {"params": 6000, "tags": 8000}              # and its longest param and tag values


@dataclass(frozen=True)
class TrackingOptions:
    """MLflow (config section ``tracking``)."""

    uri: Annotated[str | None, Field(min_length=1, description="MLflow tracking URI: a SQLite file in the project, "
                                                               "a database or a server (none: untracked)")] = \
        "sqlite:///mlruns/mlflow.db"


class TrackingError(ValueError):
    """Tracking is misconfigured (URI, experiment, pipeline-run file) or a stage misuses it."""


# -- where runs go --------------------------------------------------------------------------------------------------

def absolute_uri(uri: str) -> str:
    """A relative ``sqlite:///PATH`` made absolute against the working directory (every job, the UI and the artifact
    folder then agree on one file); any other URI unchanged."""
    prefix = "sqlite:///"
    path, sep, query = uri.partition("?")
    if path.startswith(prefix) and not path[len(prefix):].startswith("/") and path != prefix + ":memory:":
        return prefix + str(Path(path[len(prefix):]).resolve()) + sep + query
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of an absolute ``sqlite:////PATH`` URI, else None."""
    path = uri.partition("?")[0]
    return Path(path[len("sqlite:///"):]) if path.startswith("sqlite:////") else None


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a new experiment in a SQLite store: ``<db folder>/artifacts/<experiment>`` (a file URI).
    None for other stores (a tracking server or database decides for itself)."""
    db = sqlite_path(uri)
    if db is None:
        return None
    return (db.parent / "artifacts" / re.sub(r"[^A-Za-z0-9._-]+", "_", experiment)).as_uri()


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings as dotted keys, lists as JSON, everything else as ``str``: MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value, default=str)
        else:
            flat[name] = str(value)
    return flat


# -- the store ------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _locked(path: Path | None) -> Iterator[None]:
    if path is None or fcntl is None:
        yield
        return
    with open(path, "a") as f:   # closing the file releases the lock, also if the process dies
        fcntl.lockf(f, fcntl.LOCK_EX)
        yield


def _transient(e: Exception) -> bool:
    return getattr(e, "error_code", None) == "TEMPORARILY_UNAVAILABLE" or "database is locked" in str(e)


class _Store:
    """An MlflowClient whose calls on a SQLite file are serialised by ``<db>.lock`` and retried when transient."""

    def __init__(self, uri: str):
        db = sqlite_path(uri)
        self.lock = None if db is None else db.with_name(db.name + ".lock")
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        from mlflow import MlflowClient

        # The client opens the store at once, creating its tables and default experiment in a fresh file: locked.
        self.client = self.call(MlflowClient, tracking_uri=uri)

    def call(self, fn: Callable, *args, **kwargs):
        for attempt in range(_RETRIES):
            try:
                with _locked(self.lock):
                    return fn(*args, **kwargs)
            except Exception as e:
                if attempt == _RETRIES - 1 or not _transient(e):
                    raise
                time.sleep(min(0.1 * 2 ** attempt, 5.0))

    def experiment_id(self, name: str, location: str | None) -> str:
        """The experiment called ``name``, created (with ``location`` for artifacts) if there is none yet."""
        from mlflow.exceptions import MlflowException

        exp = self.call(self.client.get_experiment_by_name, name)
        if exp is None:
            try:
                return self.call(self.client.create_experiment, name, artifact_location=location)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":   # another job created it a moment ago
                    raise
                exp = self.call(self.client.get_experiment_by_name, name)
        if exp.lifecycle_stage != "active":
            raise TrackingError(f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments restore "
                                f"--experiment-id {exp.experiment_id}`) or choose another --experiment")
        return exp.experiment_id

    def log_batch(self, run_id: str, **entities: Sequence) -> None:
        for kind, items in entities.items():
            for i in range(0, len(items), _BATCH[kind]):
                self.call(self.client.log_batch, run_id, **{kind: items[i:i + _BATCH[kind]]})


@dataclass
class _Run:
    store: _Store
    run_id: str
    params: dict[str, str] = field(default_factory=dict)


_active: _Run | None = None


def active_run_id() -> str | None:
    """The id of the stage run the CLI opened, or None when tracking is off."""
    return None if _active is None else _active.run_id


# -- what stages call (no-ops without a run) ------------------------------------------------------------------------

def log_params(params: Mapping[str, Any]) -> None:
    """Record parameters (nested mappings flattened to dotted keys) on the active stage run (no-op without one).

    Logging a key again with the same value is a no-op; with another value it is an error (MLflow params are
    write-once)."""
    run = _active
    if run is None:
        return
    from mlflow.entities import Param

    new = {}
    for key, value in flatten(params).items():
        value = value[:_MAX_VALUE["params"]]
        if key in run.params and run.params[key] != value:
            raise TrackingError(f"MLflow param {key!r} was logged as {run.params[key]!r}; it cannot change to "
                                f"{value!r} (params are write-once: log a metric or a tag instead)")
        if key not in run.params:
            new[key] = value
    run.store.log_batch(run.run_id, params=[Param(k, v) for k, v in new.items()])
    run.params.update(new)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Record metrics (optionally at a step) on the active stage run (no-op without one)."""
    run = _active
    if run is None:
        return
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    run.store.log_batch(run.run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])


def log_metric_history(key: str, values: Sequence[float], steps: Sequence[int]) -> None:
    """Record a whole curve (e.g. a loss per iteration) in a few batched writes (no-op without a run)."""
    run = _active
    if run is None:
        return
    if len(values) != len(steps):
        raise TrackingError(f"metric {key!r}: {len(values)} values but {len(steps)} steps")
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    run.store.log_batch(run.run_id, metrics=[Metric(key, float(v), now, int(s)) for v, s in zip(values, steps)])


def set_tags(tags: Mapping[str, Any]) -> None:
    """Set tags (solver, nfe, … as resolved by the stage) on the active stage run (no-op without one)."""
    run = _active
    if run is None:
        return
    from mlflow.entities import RunTag

    run.store.log_batch(run.run_id, tags=[RunTag(k, str(v)[:_MAX_VALUE["tags"]]) for k, v in tags.items()
                                          if v is not None])


def log_artifact(path: str | os.PathLike, artifact_path: str | None = None) -> None:
    """Attach a file or folder to the active stage run (no-op without one)."""
    run = _active
    if run is None:
        return
    path = Path(path)
    if not path.exists():
        raise TrackingError(f"cannot log artifact {path}: no such file or folder")
    # Artifacts are files beside the database (or uploads to a server), not database writes: no lock.
    if path.is_dir():
        run.store.client.log_artifacts(run.run_id, str(path), artifact_path)
    else:
        run.store.client.log_artifact(run.run_id, str(path), artifact_path)


# -- runs -----------------------------------------------------------------------------------------------------------

OUT_TAG = "epd.out"          # a stage run's output (absolute path)
RESULTS_TAG = "epd.results"  # a pipeline run's results folder (absolute path)


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def _status(store: _Store, run_id: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return store.call(store.client.get_run, run_id).info.status
    except MlflowException:
        return None


def _close_stale(store: _Store, experiment_id: str, where: str) -> list[str]:
    """Close as KILLED the RUNNING runs that match ``where`` (an MLflow filter) and their RUNNING children: runs
    whose process died without closing them. Returns their ids."""
    runs = store.call(store.client.search_runs, [experiment_id],
                      filter_string=f"attributes.status = 'RUNNING' and {where}")
    closed = []
    for run in runs:
        children = store.call(store.client.search_runs, [experiment_id],
                              filter_string=f"attributes.status = 'RUNNING' and "
                                            f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        for r in [*children, run]:
            store.call(store.client.set_terminated, r.info.run_id, "KILLED")
            closed.append(r.info.run_id)
    return closed


def read_pipeline_run(path: str | os.PathLike) -> dict[str, Any]:
    """The pipeline-run file written by :func:`start_pipeline_run` (tracking_uri None: the pipeline is untracked)."""
    from .io import read_json_header   # epd.io imports torch: only when needed, so light jobs stay light

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pipeline-run file {path} does not exist (write it with `epd pipeline-run start "
                                f"--out {path}`)")
    info = read_json_header(path, PIPELINE_FORMAT, TrackingError, "a pipeline-run file")
    if info.get("tracking_uri") is not None and not (info.get("run_id") and info.get("experiment_id")):
        raise TrackingError(f"{path} lacks run_id or experiment_id")
    return info


def _system_tags(stage: str, command: str | None) -> dict[str, str]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):   # a container user without a passwd entry
        user = None
    tags = {"stage": stage, "mlflow.source.name": f"epd {stage}", "mlflow.source.type": "LOCAL", "mlflow.user": user,
            "epd.command": command, "slurm.job_id": os.environ.get("SLURM_JOB_ID")}
    return {k: v for k, v in tags.items() if v}


class _Terminated(SystemExit):
    """SIGTERM (scancel, a SLURM time limit, Snakemake stopping a job) as an exception, so the run is closed."""


def _terminate(signum, frame):
    raise _Terminated(128 + signum)   # the exit status a shell reports for a process killed by the signal


@contextlib.contextmanager
def _closing_on_sigterm() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def stage_run(stage: str, *, uri: str | None = None, experiment: str | None = None,
              parent: str | os.PathLike | None = None, run_name: str | None = None,
              params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
              command: str | None = None, out: str | os.PathLike | None = None) -> Iterator[str | None]:
    """Open an MLflow run for one stage; yields its id, or None when tracking is off.

    The store is ``uri``, else the pipeline-run file's, else ``$MLFLOW_TRACKING_URI``; none of them: tracking is
    off and this does nothing. With ``parent`` (a pipeline-run file, which need not exist) the run is nested under
    the pipeline run while that run is RUNNING, in its experiment; otherwise the experiment is ``experiment``, else
    ``$MLFLOW_EXPERIMENT_NAME``, else ``epd``. ``out`` (the stage's output) is tagged: a run of the same output
    still RUNNING is one whose process died (``kill -9``, a lost node), and is closed KILLED first.
    The run ends FINISHED, or FAILED if the stage raises, or KILLED on Ctrl-C or SIGTERM (the process then exits
    with status 143, as it would have without tracking). Under torchrun only rank 0 (``RANK``) opens the run; on
    the other processes this yields None and the logging calls do nothing.
    """
    global _active
    info = read_pipeline_run(parent) if parent is not None and Path(parent).is_file() else {}
    parent_uri = info.get("tracking_uri")
    uri = uri or parent_uri or os.environ.get("MLFLOW_TRACKING_URI")
    uri = absolute_uri(uri) if uri else None
    if uri and not parent_uri and info:
        info = {}   # the pipeline ran untracked: a stage tracked on its own has no parent to nest under
    if info:
        if uri != parent_uri:
            raise TrackingError(f"--tracking-uri {uri} differs from the pipeline run's store {parent_uri} ({parent})")
        if experiment and experiment != info["experiment"]:
            raise TrackingError(f"--experiment {experiment!r} differs from the pipeline run's experiment "
                                f"{info['experiment']!r} ({parent}): nested runs live in their parent's experiment")
    if not uri or int(os.environ.get("RANK", "0")) != 0:
        # untracked; or one of torchrun's other processes: rank 0 records the stage, in one run
        yield None
        return
    store = _Store(uri)
    if info and _status(store, info["run_id"]) != "RUNNING":
        info = {}   # that pipeline run is over (or its store lost it): this stage runs on its own
    if info:
        experiment_id = info["experiment_id"]
    else:
        experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        experiment_id = store.experiment_id(experiment, artifact_location(uri, experiment))
    all_tags = {k: str(v)[:_MAX_VALUE["tags"]] for k, v in {**_system_tags(stage, command), **(tags or {})}.items()
                if v is not None}
    if out is not None:
        all_tags[OUT_TAG] = str(Path(out).resolve())
        _close_stale(store, experiment_id, f"tags.`{OUT_TAG}` = '{_quote(all_tags[OUT_TAG])}'")
    if info:
        all_tags["mlflow.parentRunId"] = info["run_id"]
    run = store.call(store.client.create_run, experiment_id, run_name=run_name, tags=all_tags)
    previous, _active = _active, _Run(store, run.info.run_id)
    status = "FAILED"
    try:
        with _closing_on_sigterm():
            log_params(params or {})
            yield run.info.run_id
        status = "FINISHED"
    except (KeyboardInterrupt, _Terminated):
        status = "KILLED"
        raise
    finally:
        _active = previous
        store.call(store.client.set_terminated, run.info.run_id, status)


def start_pipeline_run(out: str | os.PathLike, *, uri: str | None = None, experiment: str | None = None,
                       run_name: str | None = None, config: Mapping[str, Any] | None = None,
                       config_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Create the pipeline (parent) run and write ``out``, the file stages get as ``--parent-run``. Pipeline runs
    of the same results folder (the folder of ``out``) still RUNNING belong to a pipeline that died: they, and
    their RUNNING stage runs, are closed KILLED first.

    Store: ``uri``, else ``$MLFLOW_TRACKING_URI``, else the config's ``tracking.uri``; with none, ``out`` records
    an untracked pipeline (its stages run untracked). Experiment: ``experiment``, else the config's ``experiment``,
    else ``$MLFLOW_EXPERIMENT_NAME``, else ``epd``. The run's params are the flattened config; the config file is
    its artifact.
    """
    config = dict(config or {})
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or (config.get("tracking") or {}).get("uri")
    experiment = experiment or config.get("experiment") or os.environ.get("MLFLOW_EXPERIMENT_NAME") \
        or DEFAULT_EXPERIMENT
    info: dict[str, Any] = {"format": PIPELINE_FORMAT, "tracking_uri": None, "experiment": experiment,
                            "experiment_id": None, "run_id": None, "run_name": None}
    if uri:
        from mlflow.entities import Param

        uri = absolute_uri(uri)
        store = _Store(uri)
        experiment_id = store.experiment_id(experiment, artifact_location(uri, experiment))
        run_name = run_name or f"{experiment} pipeline"
        results = str(Path(out).resolve().parent)
        _close_stale(store, experiment_id, f"tags.`{RESULTS_TAG}` = '{_quote(results)}'")
        run = store.call(store.client.create_run, experiment_id, run_name=run_name,
                         tags={**_system_tags("pipeline", None), RESULTS_TAG: results})
        store.log_batch(run.info.run_id, params=[Param(k, v) for k, v in flatten(config).items()])
        if config_path is not None:
            store.client.log_artifact(run.info.run_id, str(config_path))
        info.update(tracking_uri=uri, experiment_id=experiment_id, run_id=run.info.run_id, run_name=run_name)
    from .io import atomic_write

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, (json.dumps(info, indent=2) + "\n").encode())
    return info


def end_pipeline_run(path: str | os.PathLike, status: str = "FINISHED") -> dict[str, Any]:
    """Close the pipeline run recorded in ``path`` with ``status`` (no-op for an untracked pipeline)."""
    if status not in STATUSES:
        raise TrackingError(f"status must be one of {STATUSES}, got {status!r}")
    info = read_pipeline_run(path)
    if info["tracking_uri"] is not None:
        store = _Store(info["tracking_uri"])
        store.call(store.client.set_terminated, info["run_id"], status)
    return info


__all__ = ["TrackingError", "absolute_uri", "active_run_id", "artifact_location", "end_pipeline_run", "flatten",
           "log_artifact", "log_metric_history", "log_metrics", "log_params", "read_pipeline_run", "set_tags",
           "stage_run", "start_pipeline_run"]
