"""The pipeline's `docker` executor end to end: the VAE stage runs in its own image (built offline from the
debootstrapped Debian base and the wheelhouse) against this machine's S3 and MLflow servers on the host network.

The fast tests at the top need no engine: the container's environment, user and log streaming.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from interiorfusion_core.config.pipeline import PipelineStageEntry
from interiorfusion_core.errors import UserError
from interiorfusion_flows.executors import (
    StageJob,
    StageProcessError,
    _LineBuffer,
    check_artifact_location,
    container_user,
    docker_env,
    image_uid_gid,
    run_docker,
)

REPO = Path(__file__).resolve().parents[2]
PREFIX = "interiorfusion-test"
VAE_IMAGE = f"{PREFIX}/vae:latest"
IMAGE_USER = "10001:10001"
# Four optimiser steps over both curriculum phases (32³ then 64³) of a narrower smoke VAE, batch 1, one held-out
# sample, latents of the val split only: ~25 s in-process on a busy 2-core machine, where the smoke model at
# batch 2 takes 100-200 s for the same four steps (its sparse convolutions dominate).
TINY_VAE = [
    "training.max_steps=4",
    "training.curriculum.0.steps=2",
    "training.curriculum.1.steps=2",
    "training.batch_size=1",
    "training.val_batches=1",
    "model.channels=[4,4,8,8,8]",
    "loss.render_views=1",
    "encode.eval_samples=1",
    "encode.splits=[val]",
]


def _job(**kw) -> StageJob:
    fields = dict(
        stage="vae", config_path=str(REPO / "configs" / "smoke" / "vae.yaml"), overrides=[], inputs={},
        output="s3://bucket/out", force=False, parent_run_id="parent123", experiment="exp",
        entry=PipelineStageEntry(config="vae.yaml", executor="docker", image=VAE_IMAGE),
    )
    return StageJob(**(fields | kw))


# ---- no engine needed


def test_container_env_forwards_store_tracking_and_parent_run():
    host = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_S3_ADDRESSING_STYLE": "path", "AWS_SHARED_CREDENTIALS_FILE": "/root/.aws/credentials",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9000",
        "MLFLOW_TRACKING_SERVER_CERT_PATH": "/etc/ca.pem", "INTERIORFUSION_HOME": "/root/.interiorfusion",
        "HF_HOME": "/root/.cache/hf", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin", "HOME": "/root",
    }
    env = docker_env(_job(), host)
    assert env["INTERIORFUSION_PARENT_RUN_ID"] == "parent123" and env["MLFLOW_EXPERIMENT_NAME"] == "exp"
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_S3_ADDRESSING_STYLE",
                 "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "HF_HUB_OFFLINE"):
        assert env[name] == host[name], name
    # Paths of this machine mean nothing inside the image; its own PATH and HOME must stay.
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "MLFLOW_TRACKING_SERVER_CERT_PATH", "INTERIORFUSION_HOME",
                 "HF_HOME", "PATH", "HOME"):
        assert name not in env, name


@pytest.mark.parametrize("uri", [None, "sqlite:////root/.interiorfusion/mlflow.db", "file:///tmp/mlruns"])
def test_container_env_refuses_a_tracking_store_on_this_machine(uri):
    host = {"MLFLOW_TRACKING_URI": uri} if uri else {}
    with pytest.raises(UserError, match="needs an MLflow server the container can reach"):
        docker_env(_job(), host)


def test_refuses_an_experiment_whose_artifacts_stay_on_the_server_machine(tmp_path):
    from mlflow.tracking import MlflowClient

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking)
    client.create_experiment("on-disk", artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_experiment("proxied", artifact_location="mlflow-artifacts:/proxied")
    with pytest.raises(UserError, match="a directory on the MLflow server's machine"):
        check_artifact_location(tracking, "on-disk")
    check_artifact_location(tracking, "proxied")
    check_artifact_location(tracking, "not-created-yet")


def test_container_user_is_never_root():
    # S3 output: the image's own user (10001), whoever runs the pipeline.
    assert container_user(0, 0, writes_local=False) == (None, [])
    assert container_user(1000, 1000, writes_local=False) == (None, [])
    # A bind-mounted output: an ordinary user's files stay theirs (group 0 owns the image's $HOME) ...
    assert container_user(1000, 1001, writes_local=True) == ("1000:1001", [0])
    # ... but root keeps the image user, which is handed the output directory instead.
    assert container_user(0, 0, writes_local=True) == (None, [])
    assert image_uid_gid("10001:10001") == (10001, 10001)
    assert image_uid_gid("10001") == (10001, 10001)
    assert image_uid_gid("interiorfusion") is None and image_uid_gid(None) is None


def test_log_lines_survive_arbitrary_chunking():
    seen: list[str] = []
    buf = _LineBuffer(seen.append, keep=2)
    arrow = "→".encode()
    chunks = (b"step 1 lo", b"ss=0.5\nstep 2", b" loss=0.4\r\n\ndone ", arrow[:1], arrow[1:] + b" s3://x\n",
              b"err: \xff", b" end")
    for chunk in chunks:
        buf.feed(chunk)
    buf.close()
    assert seen == ["step 1 loss=0.5", "step 2 loss=0.4", "", "done → s3://x", "err: \ufffd end"]
    assert list(buf.tail) == ["done → s3://x", "err: \ufffd end"]


# ---- with a Docker engine


def build_images(docker_host: str) -> tuple[float, str]:
    env = dict(os.environ, DOCKER_HOST=docker_host)
    cmd = ["bash", str(REPO / "containers" / "build.sh"), "--stages", "data,vae", "--prefix", PREFIX]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, f"build.sh failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return time.monotonic() - t0, proc.stderr


@pytest.fixture(scope="module")
def vae_image(docker_host: str) -> str:
    """Base, data and VAE images from the Debian base and the wheelhouse (cached after the first build)."""
    seconds, log = build_images(docker_host)
    print(f"\nbuild.sh --stages data,vae: {seconds:.1f} s\n{log[log.rfind('timings:'):]}")
    return VAE_IMAGE


@pytest.fixture
def engine(docker_host: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """DOCKER_HOST for the executor's docker.from_env()."""
    monkeypatch.setenv("DOCKER_HOST", docker_host)
    return docker_host


@pytest.fixture
def started_containers(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """What the executor's containers were while they ran: their configured user and the uids of their
    processes (`docker top`), seen right after start."""
    from docker.models.containers import ContainerCollection

    seen: list[dict] = []
    original = ContainerCollection.run

    def spy(self, image, command=None, **kwargs):
        container = original(self, image, command, **kwargs)
        container.reload()
        try:
            top = container.top(ps_args="-o uid,pid,args")
            uids = [proc[top["Titles"].index("UID")] for proc in top["Processes"]]
        except Exception:  # it already exited
            uids = []
        seen.append({"user": container.attrs["Config"]["User"], "uids": uids, "image": image})
        return container

    monkeypatch.setattr(ContainerCollection, "run", spy)
    return seen


def _pipeline(tmp_path: Path, artifact_root: str, vae: dict, name: str) -> Path:
    cfg = {
        "kind": "pipeline", "name": name, "artifact_root": artifact_root,
        "experiment": f"containers-{uuid.uuid4().hex[:8]}",
        "stages": {
            "data": {"config": str(REPO / "configs" / "smoke" / "data.yaml")},
            "vae": {"config": str(REPO / "configs" / "smoke" / "vae.yaml"), "retries": 0, **vae},
        },
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _s3_object(uri: str) -> bytes:
    import boto3

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.servers
@pytest.mark.timeout(3600)
def test_pipeline_runs_the_vae_stage_in_its_container(
    vae_image, engine, s3_env, mlflow_env, started_containers, tmp_path
):
    from mlflow.tracking import MlflowClient

    from interiorfusion_core.manifest import read_manifest
    from interiorfusion_flows.pipeline import interiorfusion_pipeline

    vae = {"executor": "docker", "image": vae_image, "set": TINY_VAE}
    path = _pipeline(tmp_path, s3_env, vae, name="docker-vae")
    t0 = time.monotonic()
    record = interiorfusion_pipeline(str(path))
    print(f"\npipeline (data in-process, vae in docker): {time.monotonic() - t0:.1f} s; "
          f"timings {json.dumps(record['timings'], indent=1)}")

    # The manifest is on S3 and every artifact it lists is there with the sha256 it records.
    vae_uri = record["stages"]["vae"]
    assert vae_uri.startswith(s3_env + "/") and record["stages"]["data"].startswith(s3_env + "/")
    manifest = read_manifest(vae_uri)
    raw = json.loads(_s3_object(f"{vae_uri}/manifest.json"))
    assert raw["stage"] == "vae" and raw["cache_key"] == manifest.cache_key
    assert raw["config"]["training"]["max_steps"] == 4
    assert {"checkpoint", "latents"} <= set(manifest.outputs)
    assert manifest.inputs["data"].uri == record["stages"]["data"]
    assert any(k.endswith("model.safetensors") for k in manifest.artifacts)
    assert "eval.json" in manifest.artifacts
    for key, entry in manifest.artifacts.items():
        body = _s3_object(f"{vae_uri}/{key}")
        assert (len(body), hashlib.sha256(body).hexdigest()) == (entry.size, entry.sha256), key

    # One container, of the VAE image, running as the image's non-root user.
    assert [c["image"] for c in started_containers] == [vae_image]
    run = started_containers[0]
    assert run["user"] == IMAGE_USER
    assert run["uids"] and all(uid == "10001" for uid in run["uids"]), run

    # MLflow: the stage's run is nested under the pipeline's parent run and is the one the manifest names.
    client = MlflowClient(mlflow_env)
    parent = client.get_run(record["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    kids = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_name = {r.info.run_name: r for r in kids}
    assert set(by_name) == {"data", "vae"}
    vae_run = by_name["vae"]
    assert vae_run.info.run_id == manifest.mlflow_run_id
    assert vae_run.info.status == "FINISHED"
    assert vae_run.data.params["training.max_steps"] == "4"
    assert vae_run.data.tags["interiorfusion.output"] == vae_uri
    assert any(k.startswith("final/") for k in vae_run.data.metrics)
    # Its artifacts reached the server (proxied), not the container's own file system.
    assert {"manifest.json", "images"} <= {a.path for a in client.list_artifacts(vae_run.info.run_id)}
    assert [a.path for a in client.list_artifacts(vae_run.info.run_id, "images")] == ["images/vae_reconstruction.png"]


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.servers
@pytest.mark.timeout(3600)
def test_failing_container_raises_with_its_last_lines(vae_image, engine, s3_env, mlflow_env, started_containers):
    # The host validates the pipeline's configs before a task starts, so go straight to the executor: the
    # image's own config validation exits 2 on the unknown key.
    lines: list[str] = []
    job = _job(
        overrides=["training.max_stepz=4"], output=f"{s3_env}/bad", experiment="containers-failing",
        log=lines.append,
    )
    t0 = time.monotonic()
    with pytest.raises(StageProcessError) as info:
        run_docker(job)
    seconds = time.monotonic() - t0
    message = str(info.value)
    assert f"container {vae_image} exited with code 2" in message
    assert "training.max_stepz: unknown key" in message and "max_steps" in message, message
    assert not info.value.transient  # a bad config is never retried
    assert any("training.max_stepz: unknown key" in line for line in lines), lines  # streamed as it came
    assert seconds < 60
    assert [c["user"] for c in started_containers] == [IMAGE_USER]


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.servers
@pytest.mark.timeout(3600)
def test_failing_container_fails_its_pipeline_task(vae_image, engine, s3_env, mlflow_env, tmp_path):
    """A container that fails after the host accepted its config (here: the image has no spconv) fails the
    stage's task and the flow, with the container's last lines in the task's error."""
    from prefect.states import State

    from interiorfusion_flows.pipeline import interiorfusion_pipeline

    vae = {"executor": "docker", "image": vae_image, "set": [*TINY_VAE, "model.sparse_backend=spconv"]}
    path = _pipeline(tmp_path, s3_env, vae, name="docker-fails")
    state: State = interiorfusion_pipeline(str(path), return_state=True)
    assert state.is_failed()
    with pytest.raises(StageProcessError) as info:
        state.result()
    message = str(info.value)
    assert f"container {vae_image} exited with code 1" in message
    assert "spconv" in message and "last lines:" in message, message
    assert not info.value.transient




@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.servers
@pytest.mark.timeout(3600)
def test_local_output_is_bind_mounted_and_written_by_the_image_user(
    vae_image, engine, mlflow_env, started_containers, tmp_path
):
    """file:// outputs: mounted at the same path, written by the image's user even when this process is root
    (the directory is handed to uid 10001, never the container made root). The data stage is the cheap one."""
    from interiorfusion_core.manifest import read_manifest
    from interiorfusion_core.storage import open_store

    out = tmp_path / "out" / "data"
    job = _job(
        stage="data", config_path=str(REPO / "configs" / "smoke" / "data.yaml"), output=out.as_uri(),
        experiment="containers-local", parent_run_id=None,
        entry=PipelineStageEntry(config="data.yaml", executor="docker", image=f"{PREFIX}/data:latest"),
    )
    run_docker(job)
    manifest = read_manifest(out.as_uri())
    assert manifest.stage == "data" and manifest.artifacts
    store = open_store(out.as_uri())
    for key, entry in manifest.artifacts.items():
        assert len(store.get_bytes(key, sha256=entry.sha256)) == entry.size, key  # the store checks the sha256
    owners = {p.stat().st_uid for p in out.rglob("*")} | {out.stat().st_uid}
    root = os.getuid() == 0
    assert owners == ({10001} if root else {os.getuid()})
    user = IMAGE_USER if root else f"{os.getuid()}:{os.getgid()}"
    assert [(c["user"], set(c["uids"]) <= {user.split(":")[0]}) for c in started_containers] == [(user, True)]
