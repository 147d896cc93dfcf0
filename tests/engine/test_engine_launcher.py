"""A stage run under `accelerate launch` with 2 processes (DDP, DeepSpeed ZeRO-2; CPU gloo): rank 0 decides
cached / refused / resume / fresh and every rank follows. An interrupted run resumes on every rank, a finished one
is cached on every rank at once (no rank left waiting in process-group start-up), another config is refused by
every rank with the same sentence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_engine_program import launch_2_processes, run_program, toy_config, write_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

QUIET = {"PYTHONWARNINGS": "ignore::FutureWarning,ignore::UserWarning"}
TRAIN = dict(batch_size=4, max_steps=8, checkpoint_every=2, log_every=1)


def launch(kind: str, config: Path, out: Path, tmp: Path, timeout: float = 300, **env: str) -> Any:
    launcher = launch_2_processes(kind, env)
    return run_program(config, out, tmp, launcher=launcher, timeout=timeout, HF_HOME=str(tmp / "hf"), **QUIET, **env)


@pytest.mark.parametrize("kind", ["ddp", "zero2"])
def test_interrupted_then_cached_on_every_rank(kind: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "toy.yaml", toy_config(**TRAIN))
    out = tmp_path / "out"

    killed = launch(kind, config, out, tmp_path, ENGINE_TEST_KILL_AT="5")
    assert killed.returncode != 0
    assert not (out / "manifest.json").exists() and (out / "_run.json").exists()

    resumed = launch(kind, config, out, tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from step 4" in resumed.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["outputs"]["checkpoint"].endswith("step-00000008")

    # Rerunning the finished run: both ranks print "cached" and exit 0 (before, rank 1 hung in start-up).
    cached = launch(kind, config, out, tmp_path, timeout=120)
    assert cached.returncode == 0, cached.stdout[-3000:] + cached.stderr[-3000:]
    assert cached.stdout.count("engine-toy: cached") == 2, cached.stdout
    assert json.loads((out / "manifest.json").read_text()) == manifest

    if kind == "ddp":
        other = write_config(tmp_path / "other.yaml", toy_config(**{**TRAIN, "max_steps": 6}))
        refused = launch(kind, other, out, tmp_path, timeout=120)
        assert refused.returncode != 0
        assert refused.stderr.count("already holds a completed run of stage 'engine-toy'") == 2, refused.stderr
        assert json.loads((out / "manifest.json").read_text()) == manifest
