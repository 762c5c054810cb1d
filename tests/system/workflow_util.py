"""Shared by the pipeline tests (test_snakemake, test_slurm, test_dvc): a private copy of the pipeline's files with a
chosen config as config/config.yaml, the venv's tools on PATH (the rules call `epd`), and a private user config
folder into which `epd profiles` links the Snakemake profiles, as `.ci/setup` does for the user, so that
`snakemake --profile default` / `--profile slurm` run verbatim."""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = REPO / "tests" / "system" / "workflow_tiny.yaml"
SHARDED = REPO / "tests" / "system" / "workflow_sharded.yaml"   # TINY with its teacher and samples in shards
PIPELINE_FILES = ("Snakefile", "workflow", "dvc.yaml", ".dvcignore", "config", "data/prompts")


def project_copy(dest: Path, config: Path | None = TINY) -> Path:
    """Copy the pipeline's files into ``dest``; ``config`` replaces config/config.yaml (as the embedded default)."""
    for name in PIPELINE_FILES:
        src, dst = REPO / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    if config is not None:
        shutil.copy(config, dest / "config" / "config.yaml")
    return dest


@functools.cache
def config_home() -> str:
    """A user config folder (``$XDG_CONFIG_HOME``) holding the profiles `epd profiles` links, as for a user."""
    home = tempfile.mkdtemp(prefix="epd-config-home-")
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    subprocess.run([str(BIN / "epd"), "profiles"], env=_base_env(XDG_CONFIG_HOME=home), check=True,
                   stdout=subprocess.DEVNULL)
    return home


def _base_env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    e.update(PATH=f"{BIN}{os.pathsep}{e.get('PATH', '')}", OMP_NUM_THREADS="1", DVC_NO_ANALYTICS="1", **extra)
    return e


def env(**extra: str) -> dict[str, str]:
    """The environment of a pipeline run: the venv first on PATH, one thread per job, no ambient MLflow store, the
    profiles findable by name."""
    return _base_env(XDG_CONFIG_HOME=config_home(), **extra)


def run(cwd: Path, *cmd: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a venv tool (snakemake, dvc, epd, …) in ``cwd``; stdout and stderr together in ``.stdout``."""
    return subprocess.run([str(BIN / cmd[0]), *cmd[1:]], cwd=cwd, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def outputs(root: Path) -> dict[str, int]:
    """Every file under ``root/results`` with its mtime (ns): what a run wrote, and when."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted((root / "results").rglob("*"))
            if p.is_file()}
