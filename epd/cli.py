"""``epd`` command line: one command per stage, each defined with its flags in ``epd.stages.<command>``."""
from __future__ import annotations

import argparse
import shlex
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from . import tracking
from .config import ConfigError
from .stages import (benchmark, common, distill, evaluate, import_table, ld3, pipeline_run, profiles, rdpo, report,
                     sample, teacher, train_backbone)
from .stages import config as config_cmd

# The commands, in the order `epd --help` lists them.
COMMANDS = {
    "teacher": teacher,
    "distill": distill,
    "ld3": ld3,
    "rdpo": rdpo,
    "sample": sample,
    "evaluate": evaluate,
    "report": report,
    "benchmark": benchmark,
    "import-table": import_table,
    "train-backbone": train_backbone,
    "pipeline-run": pipeline_run,
    "config": config_cmd,
    "profiles": profiles,
}
UNTRACKED = ("pipeline-run", "config", "profiles")   # commands that are not runs of their own


class _HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default (the config flags say theirs themselves)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _version() -> str:
    try:
        return version("epd")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epd", description=__doc__,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"epd {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP,
                           formatter_class=_HelpFormatter)
        module.add_arguments(p)
        if name not in UNTRACKED:
            _add_run_flags(p)
    return parser


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("running")
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: results depend on the thread count, so one count makes a "
                        "command reproduce the pipeline's output; more rarely help on a shared machine)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("tracking (MLflow; with --config: the config's tracking.uri and experiment)")
    g.add_argument("--tracking-uri", dest="tracking_uri", metavar="URI",
                   help="MLflow store, e.g. sqlite:///mlruns/mlflow.db (default: the config's, else "
                        "$MLFLOW_TRACKING_URI; none: untracked)")
    g.add_argument("--experiment", dest="tracking_experiment", metavar="NAME",
                   help="MLflow experiment (default: the config's experiment, else $MLFLOW_EXPERIMENT_NAME, else epd)")
    g.add_argument("--parent-run", dest="tracking_parent", metavar="FILE",
                   help="file written by `epd pipeline-run start`: nest this run under that pipeline run while it "
                        "is running")
    g.add_argument("--run-name", dest="tracking_run_name", metavar="NAME",
                   help="MLflow run name (default: the command and its output's name)")


def _stage_run(args: argparse.Namespace, argv: list[str], cfg):
    """The MLflow run around one stage: params are the config sections it read and its own flags."""
    from .config import section

    module = COMMANDS[args.command]
    params = {k: v for k, v in vars(args).items()
              if "." not in k and k not in ("command", "threads", "no_progress", "weights")
              and not k.startswith("tracking_") and v is not None}
    if cfg is not None:
        params.update({name: section(cfg, name) for name in module.SECTIONS})
    out = next((getattr(args, k) for k in ("out", "outdir") if getattr(args, k, None)), None)
    name = args.tracking_run_name or (f"{args.command} {Path(out).name}" if out else args.command)
    tags = {"solver": getattr(args, "solver", None), "nfe": getattr(args, "nfe", None)}
    if cfg is not None and "backbone" in (module.SECTIONS or ()):
        tags["backbone"] = cfg.backbone.name
    uri = args.tracking_uri or (cfg.tracking.uri if cfg is not None and args.config else None)
    experiment = args.tracking_experiment or (cfg.experiment if cfg is not None and args.config else None)
    return tracking.stage_run(args.command, uri=uri, experiment=experiment, parent=args.tracking_parent,
                              run_name=name, params=params, tags=tags, command=shlex.join(["epd", *argv]), out=out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:   # --help, --version, or a flag argparse refused (it printed why)
        return int(e.code or 0)
    module = COMMANDS[args.command]
    try:
        cfg = common.resolve(args, module.SECTIONS) if module.SECTIONS is not None else None
        if args.command in UNTRACKED:
            return module.run(args, cfg)
        import torch

        from . import distributed

        wanted = module.processes(cfg) if hasattr(module, "processes") else 1
        if wanted > 1 and not distributed.launched():
            return distributed.relaunch(wanted, ["-m", "epd.cli", *argv])

        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
        # under torchrun: join the process group before any model loads, leave it also on errors
        with distributed.session(), _stage_run(args, argv, cfg):
            return module.run(args, cfg)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:  # ConfigError, TableError…
        print(f"epd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
