"""Real servers for tests, on 127.0.0.1 with free ports: S3 (`rclone serve s3`), MLflow, Prefect."""

from __future__ import annotations

from pathlib import Path

from interiorfusion_core.testing import BIN, S3Server, free_port, start_s3, stop, wait_http

REPO = Path(__file__).resolve().parents[1]
__all__ = ["BIN", "REPO", "S3Server", "free_port", "start_s3", "stop", "wait_http"]


