"""MLflow tracking for every stage. (Placeholder API; the tracking helper is implementing it now.)

Stages call these functions unconditionally; they do nothing unless the CLI opened a run (tracking enabled).
"""
from __future__ import annotations

import os
from typing import Any, Mapping


def log_params(params: Mapping[str, Any]) -> None:
    """Record parameters on the active stage run (no-op without one)."""


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Record metrics (optionally at a step) on the active stage run (no-op without one)."""


def log_artifact(path: str | os.PathLike, artifact_path: str | None = None) -> None:
    """Attach a file or folder to the active stage run (no-op without one)."""
