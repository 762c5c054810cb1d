"""What keeps Snakemake and DVC in agreement about one project's outputs.

Both tools run the same ``epd`` commands (``Snakefile`` + ``workflow/rules``, ``dvc.yaml``). Snakemake decides from
file times and the config stamps (:func:`epd.config.stamp`); DVC from the hashes in ``dvc.lock``. After Snakemake
finishes, :func:`commit_dvc` records what it made in ``dvc.lock`` (``dvc commit``), so ``dvc status`` is clean and
``dvc repro`` reruns nothing; in the other direction the stages' stamps make Snakemake see a config change made after
a ``dvc repro``."""
from __future__ import annotations

import os
from pathlib import Path


def commit_dvc(root: str | os.PathLike = ".") -> list[str]:
    """``dvc commit --force`` of every stage of ``root``'s ``dvc.yaml`` whose outputs all exist; returns the committed
    stages (none if ``root`` is no DVC project or DVC is not installed)."""
    try:
        from dvc.exceptions import NotDvcRepoError
        from dvc.repo import Repo
    except ImportError:
        return []
    try:
        repo = Repo(str(root))
    except NotDvcRepoError:
        return []
    with repo:
        done = [stage.addressing for stage in repo.index.stages
                if stage.cmd and all(Path(out.fs_path).exists() for out in stage.outs)]
        for name in done:
            repo.commit(name, force=True)
    return done
