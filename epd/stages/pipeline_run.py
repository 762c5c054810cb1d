"""``epd pipeline-run start|end``: the MLflow run a pipeline invocation's stage runs nest under."""
from __future__ import annotations

import argparse

from .. import tracking
from ..config import load_config, section
from ..config import Config as _Config
from ..workflow import commit_dvc

HELP = "open or close the MLflow pipeline run that stage runs nest under"
SECTIONS = None   # reads its --config itself: it records the whole file


def add_arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("start", help="create the pipeline run (closing runs of a pipeline that died); write FILE "
                                         "for the stages' --parent-run")
    a.add_argument("--out", required=True, metavar="FILE", help="pipeline-run file (JSON) to write")
    a.add_argument("--config", metavar="YAML", help="pipeline config: its experiment and tracking.uri; its resolved "
                                                    "sections are the run's params, the file its artifact")
    a.add_argument("--tracking-uri", dest="tracking_uri", metavar="URI",
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else the config's tracking.uri; none: untracked)")
    a.add_argument("--experiment", dest="tracking_experiment", metavar="NAME",
                   help="MLflow experiment (default: the config's)")
    a.add_argument("--run-name", dest="tracking_run_name", metavar="NAME", help="default: '<experiment> pipeline'")
    a = actions.add_parser("end", help="close the pipeline run recorded in FILE")
    a.add_argument("file", help="pipeline-run file written by `epd pipeline-run start`")
    a.add_argument("--status", choices=tracking.STATUSES, default="FINISHED")
    a.add_argument("--commit-dvc", action="store_true",
                   help="also record the finished outputs in dvc.lock (`dvc commit`), so DVC sees them up to date")


def run(args: argparse.Namespace, cfg: None) -> int:
    if args.action == "end":
        info = tracking.end_pipeline_run(args.file, status=args.status)
        if args.commit_dvc:
            stages = commit_dvc()
            print(f"dvc.lock: {len(stages)} stages recorded as made" if stages else "dvc.lock: no DVC project here")
    else:
        config = load_config(args.config) if args.config else None
        resolved = {name: section(config, name) for name in _Config.__dataclass_fields__} if config else None
        info = tracking.start_pipeline_run(args.out, uri=args.tracking_uri, experiment=args.tracking_experiment,
                                           run_name=args.tracking_run_name, config=resolved, config_path=args.config)
    where = f"run {info['run_id']} in {info['tracking_uri']}" if info["tracking_uri"] else "untracked (no store)"
    print(f"pipeline run {'ended' if args.action == 'end' else 'started'}: {info['experiment']}, {where}")
    return 0
