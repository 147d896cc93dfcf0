"""The data stage end to end: CLI, manifest, MLflow preview, resume, S3 output, synth/preview commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from interiorfusion_core.config import load_config
from interiorfusion_core.contract import run_stage
from interiorfusion_core.errors import ConfigError
from interiorfusion_core.manifest import read_manifest
from interiorfusion_data.loader import SceneLoader, open_dataset

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke" / "data.yaml"
# Smaller than smoke for the tests that only need the mechanics.
TINY = ["num_scenes=4", "render.views=1", "render.image_size=32", "voxel.resolutions=[32]", "preview_samples=1",
        "shards.samples_per_shard=1", "edits=null"]


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("INTERIORFUSION_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    return home


def cli() -> object:
    from interiorfusion_flows.cli import app

    return app


def test_stage_run_writes_shards_manifest_and_preview(tmp_path: Path) -> None:
    out = tmp_path / "data"
    result = CliRunner().invoke(cli(), ["stage", "run", "data", "--config", str(SMOKE), "--output", str(out)])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(str(out))
    assert manifest.stage == "data" and manifest.outputs["train"] == "train"
    assert {"dataset.json", "preview.png", "train/shard-000000.tar", "train/shard-000000.idx.json"} <= set(
        manifest.artifacts)
    smoke = load_config(SMOKE).model
    scenes = smoke.num_scenes
    info = json.loads((out / "dataset.json").read_text())
    assert manifest.metrics["scenes"] == scenes
    assert manifest.metrics["train_samples"] == info["splits"]["train"]["num_samples"]
    assert 0.5 * scenes <= manifest.metrics["train_samples"] < scenes
    assert info["resolutions"] == smoke.voxel.resolutions and info["image_size"] == smoke.render.image_size
    ds = open_dataset(str(out), "train")  # verified against the manifest
    batch = next(iter(SceneLoader(ds, 2, resolution=smoke.voxel.resolutions[0])))
    assert batch["coords"].shape[1] == 4 and batch["rgb"].shape[-1] == smoke.render.image_size
    # The preview went to MLflow too.
    from mlflow.tracking import MlflowClient

    arts = [a.path for a in MlflowClient().list_artifacts(manifest.mlflow_run_id, "images")]
    assert "images/data_preview.png" in arts
    # Same command again: cached.
    again = CliRunner().invoke(cli(), ["stage", "run", "data", "--config", str(SMOKE), "--output", str(out)])
    assert again.exit_code == 0 and "cached" in again.output


def test_interrupted_run_resumes_and_adopts_written_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import interiorfusion_data.stage as stage_mod

    out = tmp_path / "data"
    real = stage_mod.write_dataset

    def crash_after_two(*args: object, **kwargs: object) -> object:
        outer = kwargs["on_shard"]
        count = {"n": 0}

        def on_shard(plan: object, idx: object, stats: object) -> None:
            outer(plan, idx, stats)  # type: ignore[operator]
            count["n"] += 1
            if count["n"] == 2:
                raise RuntimeError("simulated crash")

        kwargs["on_shard"] = on_shard
        return real(*args, **kwargs)

    monkeypatch.setattr(stage_mod, "write_dataset", crash_after_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage("data", SMOKE, output=str(out), overrides=TINY)
    assert (out / "_run.json").exists() and not (out / "manifest.json").exists()
    first = {p.name: p.read_bytes() for p in (out / "train").glob("*.tar")}
    assert len(first) == 2
    monkeypatch.setattr(stage_mod, "write_dataset", real)
    outcome = run_stage("data", SMOKE, output=str(out), overrides=TINY)
    m = outcome.manifest
    assert m.metrics["shards_adopted"] == 2 and m.metrics["shards_built"] == 2
    assert {p.name: p.read_bytes() for p in (out / "train").glob("*.tar")}.items() >= first.items()
    assert {k for k in m.artifacts if k.endswith(".tar")} == {
        "train/shard-000000.tar", "train/shard-000001.tar", "val/shard-000000.tar", "test/shard-000000.tar"}
    # A fresh run of the same config writes the same bytes.
    fresh = run_stage("data", SMOKE, output=str(tmp_path / "fresh"), overrides=TINY).manifest
    assert {k: v.sha256 for k, v in fresh.artifacts.items() if k != "preview.png"} == {
        k: v.sha256 for k, v in m.artifacts.items() if k != "preview.png"}


# ---------------------------------------------------------------------------------------------- S3
@pytest.mark.servers
def test_stage_writes_to_s3_and_the_loader_streams_it_back(s3_env: str, tmp_path: Path) -> None:
    s3_prefix = s3_env
    outcome = run_stage("data", SMOKE, output=s3_prefix, overrides=["num_scenes=4", "render.views=1"])
    assert outcome.uri == s3_prefix
    manifest = read_manifest(s3_prefix)
    assert "train/shard-000000.tar" in manifest.artifacts and "dataset.json" in manifest.artifacts
    ds = open_dataset(s3_prefix, "train")
    loader = SceneLoader(ds, 1, resolution=64, num_workers=2, seed=0)
    keys = [k for b in loader for k in b["keys"]]
    assert sorted(keys) == sorted(r.key for r in ds.refs) and loader.metrics()["data/corrupt_samples"] == 0
    ahead = SceneLoader(ds, 1, resolution=64, num_workers=2, seed=0, read_ahead=3)  # ranged reads on threads
    assert [k for b in ahead for k in b["keys"]] == keys
    # Same bytes as a local run of the same config.
    local = run_stage("data", SMOKE, output=str(tmp_path / "local"), overrides=["num_scenes=4", "render.views=1"])
    shas = lambda m: {k: v.sha256 for k, v in m.artifacts.items() if k.endswith(".tar")}  # noqa: E731
    assert shas(local.manifest) == shas(manifest)


# ---------------------------------------------------------------------------------------------- CLI
def test_synth_and_preview_commands(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    runner = CliRunner()
    r = runner.invoke(cli(), ["data", "synth", str(out), "--scenes", "4", "-r", "32", "--image-size", "48",
                              "--views", "1"])
    assert r.exit_code == 0, r.output
    assert (out / "dataset.json").exists() and not (out / "manifest.json").exists()
    png = tmp_path / "sheet.png"
    r = runner.invoke(cli(), ["data", "preview", str(out), "--out", str(png), "--count", "2"])
    assert r.exit_code == 0, r.output
    from PIL import Image

    with Image.open(png) as img:
        assert img.size[0] == 6 * 160 and img.size[1] > 2 * 160  # five panels and the voxel classes
        assert len(set(img.convert("RGB").getdata())) > 100  # a picture, not a blank
    r = runner.invoke(cli(), ["data", "preview", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and "no dataset.json" in r.output and "Traceback" not in r.output
    r = runner.invoke(cli(), ["data", "synth", str(tmp_path / "m"), "--scenes", "1", "--meshes"])
    assert r.exit_code == 0 and (tmp_path / "m" / "scene-000000.ply").exists()


def test_config_is_strict_and_smoke_config_validates() -> None:
    loaded = load_config(SMOKE)
    assert loaded.kind == "data" and loaded.model.voxel.resolutions == yaml.safe_load(SMOKE.read_text())["voxel"][
        "resolutions"]
    with pytest.raises(ConfigError, match=r"voxel\.resolution: unknown key 'resolution' \(did you mean 'resolutions'"):
        load_config(SMOKE, ["voxel.resolution=[64]"])
    with pytest.raises(ConfigError, match="resolution must be a power of two"):
        load_config(SMOKE, ["voxel.resolutions=[48]"])
    with pytest.raises(ConfigError, match=r"needs importer\.path"):
        load_config(SMOKE, ["source=scannet"])
    assert load_config(REPO / "configs" / "data.yaml").model.voxel.resolutions == [256, 512, 1024]


@pytest.mark.slow
def test_module_entry_point_runs_the_stage(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "stages" / "core" / "src"), str(REPO / "stages" / "data" / "src"), os.environ.get("PYTHONPATH",
                                                                                                        "")])}
    r = subprocess.run([sys.executable, "-m", "interiorfusion_data", "--config", str(SMOKE), "--output",
                        str(tmp_path / "o"), *[a for s in TINY for a in ("--set", s)]],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "o" / "manifest.json").exists()


def test_worker_processes_write_the_same_bytes(tmp_path: Path) -> None:
    from interiorfusion_core.storage import LocalStore
    from interiorfusion_data.config import DataStageConfig
    from interiorfusion_data.pipeline import write_dataset

    base = {"num_scenes": 4, "voxel": {"resolutions": [32]}, "render": {"views": 1, "image_size": 32},
            "shards": {"samples_per_shard": 2}, "preview_samples": 0}
    shas = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        write_dataset(LocalStore(out), DataStageConfig.model_validate({**base, "num_workers": workers}), tmp_path)
        shas.append({p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()})
    assert shas[0] == shas[1]
