"""The stage contract: manifest written last, cache keys, refusal of incomplete inputs, MLflow nested runs."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import yaml
from fakestages import EchoStage
from typer.testing import CliRunner

from interiorfusion_core.contract import run_stage
from interiorfusion_core.errors import IncompleteArtifactError, StorageError, UserError
from interiorfusion_core.manifest import MANIFEST_KEY, read_manifest
from interiorfusion_core.storage import open_store


def _cfg(tmp_path: Path, kind: str, name: str | None = None, **echo) -> Path:
    p = tmp_path / (name or f"{kind}.yaml")
    data: dict = {"kind": kind}
    if echo:
        data["echo"] = echo
    p.write_text(yaml.safe_dump(data))
    return p


def test_manifest_records_artifacts_and_cache_skips(tmp_path: Path) -> None:
    out = (tmp_path / "out").as_uri()
    cfg = _cfg(tmp_path, "echo", text="abc")
    first = run_stage("echo", cfg, output=out)
    assert not first.skipped
    m = read_manifest(out)
    assert m.stage == "echo" and m.artifacts["text.txt"].size == 3
    assert m.metrics["length"] == 3.0 and m.metrics["stage_seconds"] > 0 and m.outputs == {"text": "text.txt"}
    assert m.mlflow_run_id and "interiorfusion-core" in m.code_version
    assert not (tmp_path / "out" / "_run.json").exists()
    calls = EchoStage.calls
    again = run_stage("echo", cfg, output=out)
    assert again.skipped and EchoStage.calls == calls and again.manifest.cache_key == m.cache_key
    forced = run_stage("echo", cfg, output=out, force=True)
    assert not forced.skipped and EchoStage.calls == calls + 1


def test_completed_output_of_another_config_is_never_overwritten(tmp_path: Path) -> None:
    out = (tmp_path / "out").as_uri()
    run_stage("echo", _cfg(tmp_path, "echo", text="abc"), output=out)
    with pytest.raises(UserError, match="already holds a completed run"):
        run_stage("echo", _cfg(tmp_path, "echo", "other.yaml", text="xyz"), output=out)
    assert open_store(out).get_bytes("text.txt") == b"abc"


def test_changed_upstream_changes_downstream_key(tmp_path: Path) -> None:
    a, b = (tmp_path / "a").as_uri(), (tmp_path / "b").as_uri()
    run_stage("echo", _cfg(tmp_path, "echo", text="abc"), output=a)
    up1 = run_stage("upper", _cfg(tmp_path, "upper"), inputs={"source": a}, output=(tmp_path / "u1").as_uri())
    assert open_store(up1.uri).get_bytes("upper.txt") == b"ABC"
    run_stage("echo", _cfg(tmp_path, "echo", "e2.yaml", text="abd"), output=b)
    up2 = run_stage("upper", _cfg(tmp_path, "upper"), inputs={"source": b}, output=(tmp_path / "u2").as_uri())
    assert up1.manifest.cache_key != up2.manifest.cache_key
    assert up2.manifest.inputs["source"].digest == read_manifest(b).digest


def test_incomplete_input_is_refused(tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "text.txt").write_text("half")
    with pytest.raises(IncompleteArtifactError, match="no manifest.json here"):
        run_stage("upper", _cfg(tmp_path, "upper"), inputs={"source": partial.as_uri()}, output=str(tmp_path / "u"))
    with pytest.raises(UserError, match="needs --input source=URI"):
        run_stage("upper", _cfg(tmp_path, "upper"), output=str(tmp_path / "u"))
    with pytest.raises(UserError, match="takes no input named 'bogus'"):
        run_stage("upper", _cfg(tmp_path, "upper"), inputs={"bogus": "x"}, output=str(tmp_path / "u"))


def test_failed_stage_leaves_no_manifest_and_a_failed_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(UserError, match="told to fail"):
        run_stage("echo", _cfg(tmp_path, "echo", fail=True), output=out.as_uri())
    assert not (out / MANIFEST_KEY).exists() and (out / "_run.json").exists()
    # Same config again resumes the interrupted run; another config is refused until --restart.
    with pytest.raises(UserError, match="unfinished run with another config"):
        run_stage("echo", _cfg(tmp_path, "echo", "ok.yaml", text="fine"), output=out.as_uri())
    done = run_stage("echo", _cfg(tmp_path, "echo", "ok.yaml", text="fine"), output=out.as_uri(), restart=True)
    assert read_manifest(done.uri).artifacts.keys() == {"text.txt"}


@pytest.mark.servers
def test_s3_output_and_nested_mlflow_runs_on_a_server(s3_env: str, mlflow_env: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from interiorfusion_core.tracking import Tracker

    parent = Tracker("pipeline-test", tags={"kind": "parent"})
    run_stage("echo", _cfg(tmp_path, "echo", text="abc"), output=f"{s3_env}/echo", parent_run_id=parent.run_id)
    run_stage("upper", _cfg(tmp_path, "upper"), inputs={"source": f"{s3_env}/echo"}, output=f"{s3_env}/upper",
              parent_run_id=parent.run_id)
    parent.end()
    store = open_store(f"{s3_env}/upper")
    m = read_manifest(store)
    for key, entry in m.artifacts.items():
        assert store.stat(key).sha256 == entry.sha256
    client = MlflowClient(mlflow_env)
    exp = client.get_experiment_by_name("interiorfusion")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["echo", "upper"]
    echo = next(r for r in children if r.info.run_name == "echo")
    assert echo.data.params["echo.text"] == "abc"
    assert echo.data.metrics["length"] == 3.0 and echo.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(echo.info.run_id)] == ["config.json", "manifest.json"]


@pytest.mark.servers
def test_unreachable_mlflow_server_is_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from testservers import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(UserError, match="MLflow server at http://127.0.0.1:.* is not reachable"):
        run_stage("echo", _cfg(tmp_path, "echo"), output=str(tmp_path / "o"))


@pytest.mark.servers
@pytest.mark.slow
def test_s3_server_killed_mid_upload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from testservers import start_s3, stop

    from interiorfusion_core import storage

    server = start_s3(tmp_path / "s3")
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("INTERIORFUSION_S3_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("INTERIORFUSION_S3_CONNECT_TIMEOUT", "2")
    storage._S3_CLIENTS.clear()
    out = f"s3://{server.bucket}/killed"
    errors: list[BaseException] = []

    def run() -> None:
        try:
            run_stage("echo", _cfg(tmp_path, "echo", size_mb=300), output=out)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    blob_parts = server.root / server.bucket
    deadline = time.monotonic() + 60
    # Kill the server once the big upload has started (rclone stages multipart parts on disk).
    while time.monotonic() < deadline and t.is_alive():
        if (tmp_path / "s3").exists() and sum(1 for _ in blob_parts.rglob("*")) > 3:
            break
        time.sleep(0.05)
    time.sleep(0.3)
    stop(server.proc)
    t.join(120)
    storage._S3_CLIENTS.clear()
    assert errors and isinstance(errors[0], StorageError), errors
    assert "upload failed" in str(errors[0]) and "blob.bin" in str(errors[0])
    manifest = blob_parts / "killed" / MANIFEST_KEY
    assert not manifest.exists()


def test_cli_stage_run_and_errors(tmp_path: Path) -> None:
    from interiorfusion_flows.cli import app

    runner = CliRunner()
    cfg = _cfg(tmp_path, "echo", text="cli")
    out = tmp_path / "cli-out"
    res = runner.invoke(app, ["stage", "run", "echo", "--config", str(cfg), "--output", str(out),
                              "--set", "echo.text=changed"])
    assert res.exit_code == 0, res.output
    assert (out / "text.txt").read_text() == "changed"
    assert json.loads((out / MANIFEST_KEY).read_text())["config"]["echo"]["text"] == "changed"
    res = runner.invoke(app, ["stage", "run", "echo", "--config", str(cfg), "--output", str(out),
                              "--set", "echo.txt=x"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [f"{cfg}: echo.txt: unknown key 'txt' (did you mean 'text'?)"]
    res = runner.invoke(app, ["stage", "run", "nosuch", "--config", str(cfg), "--output", str(out)])
    assert res.exit_code == 1 and "unknown stage 'nosuch'" in res.output
    res = runner.invoke(app, ["stage", "run", "upper", "--config", str(_cfg(tmp_path, "upper")),
                              "--input", f"source={tmp_path / 'nothing'}", "--output", str(tmp_path / "u")])
    assert res.exit_code == 1 and "no manifest.json here" in res.output and "Traceback" not in res.output


def test_cli_help_describes_every_option() -> None:
    from interiorfusion_flows.cli import app

    runner = CliRunner()
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0 and "config" in top.output and "stage" in top.output
    res = runner.invoke(app, ["stage", "run", "--help"], terminal_width=200)
    assert res.exit_code == 0
    for opt in ("--config", "--set", "--input", "--output", "--force", "--restart"):
        assert opt in res.output
    assert res.output.count("[required]") >= 2


def test_config_check_cli(tmp_path: Path) -> None:
    from interiorfusion_flows.cli import app

    repo = Path(__file__).resolve().parents[2]
    runner = CliRunner()
    files = sorted(str(p) for p in (repo / "configs").glob("*.yaml"))
    res = runner.invoke(app, ["config", "check", *files])
    assert res.exit_code == 0, res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  latent_dimm: 4\nloss:\n  reconstruction: {weight: 1}\n")
    res = runner.invoke(app, ["config", "check", str(bad)])
    assert res.exit_code == 2
    assert res.output.strip() == f"{bad}: model.latent_dimm: unknown key 'latent_dimm' (did you mean 'latent_dim'?)"
    res = runner.invoke(app, ["config", "check", "--show", files[0]])
    assert "zero_stage: 3" in res.output
