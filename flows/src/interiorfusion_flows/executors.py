"""Where a stage runs: in this process, in child processes under `accelerate launch`, in its container image
(docker SDK), or as a Kubernetes Job. Every executor has the same contract: run the stage against input URIs
and an output prefix, then the manifest at that prefix is the result."""

from __future__ import annotations

import codecs
import os
import shlex
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from interiorfusion_core.config.pipeline import PipelineStageEntry
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
    # The pipeline instance this job runs (its MLflow run's name); None outside a pipeline: the stage's name.
    run_name: str | None = None

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
        if self.run_name:
            env["INTERIORFUSION_RUN_NAME"] = self.run_name
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
            force=job.force, parent_run_id=job.parent_run_id, run_name=job.run_name,
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


# The docker executor also forwards the AWS SDK's and MLflow's own settings by prefix (MLFLOW_S3_ENDPOINT_URL,
# MLFLOW_TRACKING_TOKEN, AWS_S3_ADDRESSING_STYLE, ...), except those naming a file on this machine, which the
# container does not have (AWS_SHARED_CREDENTIALS_FILE, AWS_CA_BUNDLE, MLFLOW_TRACKING_SERVER_CERT_PATH).
DOCKER_ENV_PREFIXES = ("AWS_", "MLFLOW_")
HOST_PATH_SUFFIXES = ("_FILE", "_PATH", "_BUNDLE", "_DIR")
# Tracking URIs a container reaches over the network; anything else (sqlite:, file:, a path) is on this machine.
REMOTE_TRACKING = ("http://", "https://", "databricks")
CONTAINER_TAIL_LINES = 20


def docker_env(job: StageJob, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The container's environment: the artifact store, tracking server and pipeline's parent run."""
    environ = os.environ if environ is None else environ
    env = {
        k: v for k, v in environ.items()
        if k.startswith(DOCKER_ENV_PREFIXES) and not k.endswith(HOST_PATH_SUFFIXES)
    }
    env |= {k: environ[k] for k in FORWARDED_ENV if k in environ}
    env["MLFLOW_EXPERIMENT_NAME"] = job.experiment
    if job.parent_run_id:
        env["INTERIORFUSION_PARENT_RUN_ID"] = job.parent_run_id
    if job.run_name:
        env["INTERIORFUSION_RUN_NAME"] = job.run_name
    for host_dir in ("INTERIORFUSION_HOME", "HF_HOME"):  # directories of this machine, absent in the container
        env.pop(host_dir, None)
    env.setdefault("COLUMNS", "200")  # rich wraps at 80 columns without a terminal; keep log lines whole
    env |= job.env
    uri = env.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(REMOTE_TRACKING):
        where = f"MLFLOW_TRACKING_URI={uri}" if uri else "no MLFLOW_TRACKING_URI (the local SQLite default)"
        raise UserError(
            f"stage '{job.stage}': the docker executor needs an MLflow server the container can reach, but this "
            f"machine has {where}; start `mlflow server` and set MLFLOW_TRACKING_URI=http://HOST:PORT"
        )
    return env


def _absolute(uri: str) -> str:
    """A plain relative path made absolute: the container's working directory is not this one."""
    path = local_path(uri)
    return str(path) if path is not None and "://" not in uri else uri


def check_artifact_location(tracking: str, experiment: str) -> None:
    """Refuse an MLflow experiment whose artifacts go to a directory (file:) on the server's machine: the MLflow
    client inside the container would write them into its own file system, where they are lost. A server with
    proxied artifacts (`mlflow server --artifacts-destination ...`, locations `mlflow-artifacts:/`) or an object
    store (s3://) works. An experiment that does not exist yet is created by the stage with the server's default.
    """
    from mlflow.tracking import MlflowClient

    try:
        exp = MlflowClient(tracking_uri=tracking).get_experiment_by_name(experiment)
    except Exception as exc:
        raise UserError(f"MLflow server at {tracking} did not answer ({exc})", transient=True) from None
    location = exp.artifact_location if exp is not None else ""
    if location.startswith("file:") or location.startswith("/"):
        raise UserError(
            f"MLflow experiment '{experiment}' stores artifacts at {location}, a directory on the MLflow server's "
            "machine that a container cannot write; serve artifacts through the server (`mlflow server "
            "--artifacts-destination DIR_OR_S3`) and use a new experiment"
        )


def local_path(uri: str) -> Path | None:
    """The host path of a file:// URI or plain path; None for s3:// and other remote URIs."""
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    if "://" in uri:
        return None
    return Path(uri).absolute()


def container_user(host_uid: int, host_gid: int, writes_local: bool) -> tuple[str | None, list[int]]:
    """(user, extra groups) for `docker run`.

    The image's own non-root user (10001) unless the stage writes a bind-mounted host directory and this
    process is an ordinary user: then that user's uid:gid, so the files on the host are theirs, plus group 0,
    which owns the image's writable $HOME and /workspace. Never root: a root host process keeps the image's
    user, and `run_docker` hands that user the output directory instead.
    """
    if writes_local and host_uid != 0:
        return f"{host_uid}:{host_gid}", [0]
    return None, []


def image_uid_gid(user: str | None) -> tuple[int, int] | None:
    """Numeric uid:gid of an image's `USER` (None when unset or by name)."""
    uid, _, gid = (user or "").partition(":")
    if not uid.isdigit():
        return None
    return int(uid), int(gid) if gid.isdigit() else int(uid)


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), uid, gid)


class _LineBuffer:
    """Docker's log stream arrives in arbitrary chunks; hand on whole lines and keep the last few."""

    def __init__(self, log: Callable[[str], None], keep: int = CONTAINER_TAIL_LINES) -> None:
        self.log = log
        self.tail: deque[str] = deque(maxlen=keep)
        self._partial = ""
        # A chunk may end inside a multi-byte character (rich's box drawing, arrows): decode incrementally.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, chunk: bytes) -> None:
        text = self._partial + self._decoder.decode(chunk).replace("\r\n", "\n")
        *lines, self._partial = text.split("\n")
        for line in lines:
            self._emit(line)

    def close(self) -> None:
        self._partial += self._decoder.decode(b"", final=True)
        if self._partial:
            self._emit(self._partial)
            self._partial = ""

    def _emit(self, line: str) -> None:
        line = line.rstrip()
        self.tail.append(line)
        self.log(line)


def run_docker(job: StageJob) -> None:
    """The stage's image with the S3/MLflow/Prefect settings in its environment, on the host network (so the
    container reaches servers on the host's 127.0.0.1), GPUs requested when the entry asks for them.

    The config file is mounted read-only at its host path; local (file://) inputs are mounted read-only and a
    local output read-write, each at the same path, so URIs mean the same inside. Output lines are streamed to
    the task's log as they come; a non-zero exit raises with the container's last lines.
    """
    try:
        import docker
        from docker.errors import DockerException, ImageNotFound
    except ImportError as exc:
        raise UserError("the docker executor needs the `docker` package (pip install docker)") from exc
    image = job.entry.image or f"interiorfusion/{job.stage}:latest"
    env = docker_env(job)
    check_artifact_location(env["MLFLOW_TRACKING_URI"], env["MLFLOW_EXPERIMENT_NAME"])
    try:
        client = docker.from_env()
        client.ping()
    except DockerException as exc:
        msg = f"cannot reach a Docker engine ({exc}); start dockerd or set DOCKER_HOST"
        raise UserError(msg, transient=True) from None
    try:
        image_user = client.images.get(image).attrs.get("Config", {}).get("User")
    except ImageNotFound:
        raise UserError(f"docker image '{image}' not found; build it with `make images`") from None

    config = Path(job.config_path).resolve()
    if not config.is_file():
        raise UserError(f"stage '{job.stage}': config {job.config_path} not found")
    mounts = [docker.types.Mount(str(config), str(config), type="bind", read_only=True)]
    for uri in job.inputs.values():
        path = local_path(uri)
        if path is not None:
            mounts.append(docker.types.Mount(str(path), str(path), type="bind", read_only=True))
    output = local_path(job.output)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        mounts.append(docker.types.Mount(str(output), str(output), type="bind"))
    user, groups = container_user(os.getuid(), os.getgid(), writes_local=output is not None)
    if output is not None and user is None and os.getuid() == 0:
        # This process is root; the container is not. Its output directory becomes the image user's.
        ids = image_uid_gid(image_user)
        if ids is None:
            raise UserError(f"docker image '{image}' has no numeric USER; cannot hand it {output}")
        if output.stat().st_uid != ids[0]:
            _chown_tree(output, *ids)
    device_requests = (
        [docker.types.DeviceRequest(count=job.entry.gpus, capabilities=[["gpu"]])] if job.entry.gpus else None
    )
    args = replace(
        job, config_path=str(config), output=_absolute(job.output),
        inputs={name: _absolute(uri) for name, uri in job.inputs.items()},
    ).cli_args()
    job.log(f"docker run {image} {shlex.join(args)}")
    container = client.containers.run(
        image, args, environment=env, network_mode="host", detach=True, mounts=mounts,
        device_requests=device_requests, user=user, group_add=groups or None,
        labels={"org.interiorfusion.stage": job.stage},
    )
    try:
        lines = _LineBuffer(job.log)
        for chunk in container.logs(stream=True, follow=True):
            lines.feed(chunk)
        lines.close()
        code = container.wait().get("StatusCode", 1)
        if code != 0:
            container.reload()
            oom = container.attrs.get("State", {}).get("OOMKilled", False)
            last = "\n".join(lines.tail)
            why = " (killed: out of memory)" if oom else ""
            raise StageProcessError(
                f"container {image} exited with code {code}{why}; last lines:\n{last}",
                transient=oom or code in (137, 143),
            )
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
