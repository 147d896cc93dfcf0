"""A StageContext for running the Trainer outside `run_stage` (benchmarks, launched test programs, notebooks)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from interiorfusion_core.config import LoadedConfig
from interiorfusion_core.config.base import StageConfig
from interiorfusion_core.contract import RecordingStore, StageContext
from interiorfusion_core.state import distributed_rank
from interiorfusion_core.storage import open_store
from interiorfusion_core.tracking import NullTracker, Tracker


def local_context(
    config: StageConfig,
    output: str | Path,
    *,
    kind: str | None = None,
    stage: str = "local",
    tracker: Tracker | None = None,
    work_dir: str | Path | None = None,
) -> StageContext:
    """`output` is a directory, file:// or s3:// prefix; the tracker defaults to a NullTracker."""
    loaded = LoadedConfig(kind=kind or config.kind or type(config).__name__, model=config, path="<in-memory>")
    store = RecordingStore(open_store(output))
    rank, world = distributed_rank()
    if work_dir is None:  # ours: gone when the process ends
        work_dir = tempfile.mkdtemp(prefix="interiorfusion-work-")
        atexit.register(shutil.rmtree, work_dir, ignore_errors=True)
    work = Path(work_dir)
    return StageContext(
        stage=stage, loaded=loaded, inputs={}, output=store, tracker=tracker or NullTracker(), cache_key="local",
        work_dir=work, rank=rank, world_size=world, resumed=store.exists("checkpoints/latest"),
    )


__all__ = ["local_context"]
