import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _project_copy_folder(tmp_path_factory, monkeypatch):
    """Each unit test runs in a scratch folder that sees the repository's data/ (the defaults' relative paths, such as
    data/prompts/digits.txt, resolve as in the project root), so what a stage writes relative to the working folder
    (the MLflow store mlruns/, the config stamps under results/) lands there, not in the developer's checkout."""
    work = tmp_path_factory.mktemp("cwd")
    os.symlink(REPO / "data", work / "data")
    monkeypatch.chdir(work)
