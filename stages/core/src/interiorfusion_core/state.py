"""The embedded default's local state: artifacts, MLflow's SQLite file, Prefect's home, all under one folder."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """`$INTERIORFUSION_HOME`, else `.interiorfusion/` in the working directory."""
    root = Path(os.environ.get("INTERIORFUSION_HOME") or Path.cwd() / ".interiorfusion").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def artifact_root() -> str:
    """Where stage outputs go by default: `$INTERIORFUSION_ARTIFACT_ROOT` (e.g. s3://bucket/prefix) or local."""
    return os.environ.get("INTERIORFUSION_ARTIFACT_ROOT") or (state_dir() / "artifacts").as_uri()


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (torchrun/accelerate set RANK and WORLD_SIZE)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
