"""Where a stage runs: in this process, in child processes under `accelerate launch`, in its container image
(docker SDK), or as a Kubernetes Job. Every executor has the same contract: run the stage against input URIs
and an output prefix, then the manifest at that prefix is the result."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from interiorfusion_core.config.schemas import PipelineStageEntry
from interiorfusion_core.contract import run_stage
from interiorfusion_core.errors import UserError

# Environment a stage needs to reach the same artifact store, tracking server and orchestrator.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "PREFECT_API_URL",
    "INTERIORFUSION_ARTIFACT_ROOT", "INTERIORFUSION_HOME", "INTERIORFUSION_SPARSE_BACKEND", "HF_HUB_OFFLINE",
    "HF_HOME", "INTERIORFUSION_GIT_SHA",
)


@dataclass
class StageJob:
    stage: str
    config_path: str
    overrides: list[str]
    inputs: dict[str, str]
    output: str
    force: bool
    parent_run_id: str | None
    experiment: str
    entry: PipelineStageEntry
    log: Callable[[str], None] = print
    env: dict[str, str] = field(default_factory=dict)

    def cli_args(self) -> list[str]:
        args = ["--config", self.config_path, "--output", self.output]
        for item in self.overrides:
            args += ["--set", item]
        for name, uri in self.inputs.items():
            args += ["--input", f"{name}={uri}"]
        if self.force:
            args.append("--force")
        return args

    def child_env(self) -> dict[str, str]:
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        env["MLFLOW_EXPERIMENT_NAME"] = self.experiment
        if self.parent_run_id:
            env["INTERIORFUSION_PARENT_RUN_ID"] = self.parent_run_id
        return env | self.env


class StageProcessError(UserError):
    """A stage run outside this process exited non-zero; carries its last lines."""


def run_inprocess(job: StageJob) -> None:
    previous = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    os.environ["MLFLOW_EXPERIMENT_NAME"] = job.experiment
    try:
        run_stage(
            job.stage, job.config_path, inputs=job.inputs, output=job.output, overrides=tuple(job.overrides),
            force=job.force, parent_run_id=job.parent_run_id,
        )
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_NAME"] = previous


def subprocess_command(job: StageJob) -> list[str]:
    module = f"interiorfusion_{job.stage}"
    if job.entry.num_processes <= 1:
        return [sys.executable, "-m", module, *job.cli_args()]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(job.entry.num_processes)]
    if job.entry.accelerate_config:
        launch += ["--config_file", job.entry.accelerate_config]
    return [*launch, "-m", module, *job.cli_args()]


def _stream(cmd: list[str], env: dict[str, str], log: Callable[[str], None], what: str) -> None:
    # Enough lines to hold the stage's own error above torchrun's failure summary (about 15 lines).
    tail: deque[str] = deque(maxlen=50)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail.append(line)
        log(line)
    code = proc.wait()
    if code != 0:
        last = "\n".join(tail)
        raise StageProcessError(f"{what} exited with code {code}; last lines:\n{last}", transient=code in (137, 143))


def run_subprocess(job: StageJob) -> None:
    env = {**os.environ, **job.child_env()}
    if job.entry.num_processes > 1 and "DS_ACCELERATOR" not in env:
        try:
            import torch

            if not torch.cuda.is_available():
                env["DS_ACCELERATOR"] = "cpu"
        except ImportError:
            pass
    cmd = subprocess_command(job)
    job.log(f"$ {shlex.join(cmd)}")
    _stream(cmd, env, job.log, f"stage '{job.stage}' ({job.entry.num_processes} process(es))")


def run_docker(job: StageJob) -> None:
    """The stage's image with the S3/MLflow/Prefect settings in its environment, on the host network (so the
    container reaches servers on the host's 127.0.0.1), GPUs requested when the entry asks for them."""
    try:
        import docker
        from docker.errors import DockerException, ImageNotFound
    except ImportError as exc:
        raise UserError("the docker executor needs the `docker` package (pip install docker)") from exc
    image = job.entry.image or f"interiorfusion/{job.stage}:latest"
    try:
        client = docker.from_env()
        client.ping()
    except DockerException as exc:
        msg = f"cannot reach a Docker engine ({exc}); start dockerd or set DOCKER_HOST"
        raise UserError(msg, transient=True) from None
    try:
        client.images.get(image)
    except ImageNotFound:
        raise UserError(f"docker image '{image}' not found; build it with `make images`") from None
    env = job.child_env()
    env.pop("INTERIORFUSION_HOME", None)  # the host's state dir does not exist in the container
    mounts = []
    # Local (file://) inputs/outputs are bind-mounted at the same path so URIs stay valid inside.
    for uri in [job.output, *job.inputs.values()]:
        if uri.startswith("file://") or uri.startswith("/"):
            path = uri.removeprefix("file://")
            root = Path(path)
            root.mkdir(parents=True, exist_ok=True)
            mounts.append(docker.types.Mount(str(root), str(root), type="bind"))
    device_requests = (
        [docker.types.DeviceRequest(count=job.entry.gpus, capabilities=[["gpu"]])] if job.entry.gpus else None
    )
    job.log(f"docker run {image} {shlex.join(job.cli_args())}")
    container = client.containers.run(
        image, job.cli_args(), environment=env, network_mode="host", detach=True, mounts=mounts,
        device_requests=device_requests, user=f"{os.getuid()}:{os.getgid()}" if mounts else None,
    )
    try:
        for chunk in container.logs(stream=True, follow=True):
            for line in chunk.decode(errors="replace").splitlines():
                job.log(line)
        status = container.wait()
        code = status.get("StatusCode", 1)
        if code != 0:
            last = container.logs(tail=20).decode(errors="replace")
            raise StageProcessError(f"container {image} exited with code {code}; last lines:\n{last}")
    finally:
        container.remove(force=True)


def run_kubernetes(job: StageJob) -> None:
    raise UserError(
        f"stage '{job.stage}': the kubernetes executor runs through a Prefect Kubernetes work pool; deploy the "
        "pipeline with `prefect deploy` (infra/kubernetes/) instead of running it locally"
    )


EXECUTORS: dict[str, Callable[[StageJob], None]] = {
    "inprocess": run_inprocess,
    "subprocess": run_subprocess,
    "docker": run_docker,
    "kubernetes": run_kubernetes,
}
