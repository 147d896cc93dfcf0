"""Checkpoints are complete or absent: index last, incomplete directories ignored, keep-last-k, sha256 verified on
load, RNG state round-trips through weights_only loading."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from interiorfusion_core.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    load_state_dict,
    load_torch,
    restore_rng_state,
    save_state_dict,
    save_torch,
)
from interiorfusion_core.contract import RecordingStore
from interiorfusion_core.engine import Trainer, local_context
from interiorfusion_core.engine.toy import ToyEngineConfig, ToyTask
from interiorfusion_core.errors import ChecksumError
from interiorfusion_core.storage import LocalStore


def write(manager: CheckpointManager, step: int, *, commit: bool = True) -> Any:
    w = manager.begin(step)
    w.add_state_dict("model.safetensors", {"w": torch.full((3,), float(step))})
    w.add_json("scheduler.json", {"last_epoch": step})
    w.add_torch("rng/rank-00000.pt", capture_rng_state())
    return manager.commit(step, w.infos, {"epoch": 0}) if commit else w


@pytest.fixture
def manager(tmp_path: Path) -> CheckpointManager:
    return CheckpointManager(RecordingStore(LocalStore(tmp_path / "out")), keep_last=2, work_dir=tmp_path / "work")


def test_index_is_last_and_lists_every_file_with_sha256(manager: CheckpointManager, tmp_path: Path) -> None:
    info = write(manager, 10)
    ckpt = tmp_path / "out/checkpoints/step-00000010"
    index = json.loads((ckpt / "checkpoint.json").read_text())
    assert set(index["files"]) == {"model.safetensors", "scheduler.json", "rng/rank-00000.pt"}
    assert index["files"]["model.safetensors"] == manager.store.stat("step-00000010/model.safetensors").to_json()
    assert index["format"] == "interiorfusion.checkpoint/1" and index["step"] == 10
    assert json.loads((tmp_path / "out/checkpoints/latest").read_text()) == {"step": 10, "dir": "step-00000010"}
    assert info.key == "checkpoints/step-00000010"
    assert torch.equal(manager.load_state_dict(info)["w"], torch.full((3,), 10.0))


def test_directory_without_index_is_ignored(manager: CheckpointManager, tmp_path: Path) -> None:
    write(manager, 10)
    write(manager, 20, commit=False)  # files uploaded, index never written (a crash mid-save)
    assert manager.steps() == [10]
    assert manager.steps(complete_only=False) == [10, 20]
    assert manager.latest().step == 10
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        manager.get(20)


def test_keep_last_k_and_stale_directories(manager: CheckpointManager, tmp_path: Path) -> None:
    for step in (10, 20):
        write(manager, step)
    write(manager, 25, commit=False)  # stale: older than the next complete one
    write(manager, 30)
    assert manager.steps(complete_only=False) == [20, 30]
    write(manager, 40)
    assert manager.steps() == [30, 40]
    assert not (tmp_path / "out/checkpoints/step-00000020").exists()
    # the manifest record follows the deletions
    assert not any("step-00000020" in k for k in manager.output.record)


def test_rewriting_a_step_replaces_it(manager: CheckpointManager) -> None:
    write(manager, 10)
    w = manager.begin(10)  # e.g. the same step reached again after a rollback
    assert manager.steps() == []  # the old index went first
    w.add_state_dict("model.safetensors", {"w": torch.zeros(3)})
    info = manager.commit(10, w.infos, {})
    assert set(info.files) == {"model.safetensors"}


def test_corrupted_file_raises_checksum_error_naming_the_key(manager: CheckpointManager, tmp_path: Path) -> None:
    info = write(manager, 30)
    path = tmp_path / "out/checkpoints/step-00000030/model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"step-00000030/model\.safetensors"):
        manager.load_state_dict(info)


def test_resume_refuses_a_corrupted_checkpoint(tmp_path: Path) -> None:
    cfg = ToyEngineConfig.model_validate({
        "model": {"hidden": 8}, "data": {"num_samples": 16, "val_samples": 0},
        "training": {"batch_size": 4, "max_steps": 4, "checkpoint_every": 2, "mixed_precision": "no"},
    })
    Trainer(local_context(cfg, tmp_path / "out"), ToyTask(cfg)).fit()
    opt = tmp_path / "out/checkpoints/step-00000004/optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:-8])
    with pytest.raises(ChecksumError, match=r"checksum mismatch for 'step-00000004/optimizer\.pt'"):
        Trainer(local_context(cfg, tmp_path / "out"), ToyTask(cfg)).fit()


def test_rng_state_round_trips_through_weights_only(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # a cached gaussian in numpy's state
    state = capture_rng_state()
    save_torch(state, tmp_path / "rng.pt")
    draws = (random.random(), np.random.normal(), torch.rand(3))
    restore_rng_state(load_torch(tmp_path / "rng.pt"))  # torch.load(weights_only=True) inside
    again = (random.random(), np.random.normal(), torch.rand(3))
    assert draws[0] == again[0] and draws[1] == again[1] and torch.equal(draws[2], again[2])


def test_tied_weights_save_and_load(tmp_path: Path) -> None:
    emb = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    state = {"emb.weight": emb.weight, "head.weight": head.weight}
    save_state_dict(state, tmp_path / "m.safetensors")
    loaded = load_state_dict(tmp_path / "m.safetensors")
    assert torch.equal(loaded["emb.weight"], loaded["head.weight"])
