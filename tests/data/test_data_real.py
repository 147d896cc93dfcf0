"""InteriorFusion-Real without datasets: several sources in one data instance (`sources:`), simulated scans
(`importer.simulate`) imported by the real ScanNet and HM3D importers, and configs/smoke/real.yaml end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from interiorfusion_core.config import load_config
from interiorfusion_core.contract import request_stage, run_stage
from interiorfusion_core.errors import ConfigError
from interiorfusion_core.storage import LocalStore
from interiorfusion_data.config import DataStageConfig
from interiorfusion_data.loader import open_dataset
from interiorfusion_data.pipeline import SceneSource, write_dataset
from interiorfusion_data.procedural import ProceduralOptions, generate_scene
from interiorfusion_data.scan_layouts import scan_poses, write_scannet_scan

REPO = Path(__file__).resolve().parents[2]
REAL = REPO / "configs" / "smoke" / "real.yaml"
SMOKE = REPO / "configs" / "smoke" / "data.yaml"
SMALL = {"size_range": [3.0, 4.0], "max_objects": 5}
# Two simulated scan sources; the errors below are stated against it.
MULTI = {"kind": "data", "dataset": "InteriorFusion-Real",
         "sources": [{"source": "scannet", "procedural": SMALL, "importer": {"simulate": {"num_scenes": 2}}},
                     {"source": "hm3d", "procedural": SMALL, "importer": {"simulate": {"num_scenes": 2}}}],
         "voxel": {"resolutions": [32]}}


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERIORFUSION_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


def test_real_smoke_config_runs_the_data_stage(tmp_path: Path) -> None:
    out = (tmp_path / "real").as_uri()
    outcome = run_stage("data", REAL, output=out)
    m = outcome.manifest
    assert m.config["dataset"] == "InteriorFusion-Real" and [s["source"] for s in m.config["sources"]] == [
        "scannet", "hm3d"]
    assert m.metrics["scenes_scannet"] == 3 and m.metrics["scenes_hm3d"] == 3
    info = json.loads((tmp_path / "real" / "dataset.json").read_text())
    assert info["source"] == "scannet+hm3d" and [(s["source"], s["num_scenes"], s["simulated"]) for s in
                                                   info["sources"]] == [("scannet", 3, True), ("hm3d", 3, True)]
    keys = []
    for split in ("train", "val", "test"):  # every split has samples (a fine-tuning stage evaluates on val and test)
        ds = open_dataset(outcome.uri, split)  # verified against the manifest
        assert len(ds) > 0, split
        for i in range(len(ds)):
            s = ds.get(i)
            keys.append(s["meta"]["key"])
            src = s["meta"]["scene"]["source"]
            assert s["meta"]["key"].startswith(f"{src}-") and s["meta"]["scene"]["simulated"]
            assert s["present"]["captured_frames"] is (src == "scannet")
            assert s["present"]["voxel_labels"] and not s["present"]["materials"]
            assert s["rgb"].shape == (2, 64, 64, 3) and s["meta"]["frame"]["kind"] == "fit"
            assert s["meta"]["resolutions"] == [32, 64]
            if src == "scannet":  # captured depth: ~1% holes, otherwise a surface everywhere inside the room
                assert 0.95 < (s["depth"] > 0).mean() < 1.0
    assert {k.split("-")[0] for k in keys} == {"scannet", "hm3d"}
    # Same config again: cached; a different simulation is another cache key.
    assert run_stage("data", REAL, output=out).skipped
    cache_keys = {request_stage("data", REAL, overrides=o).key for o in
            ([], ["sources.0.importer.simulate.seed=5"], ["sources.1.importer.simulate.num_scenes=2"])}
    assert len(cache_keys) == 3


def test_sources_build_one_dataset_of_every_source(tmp_path: Path) -> None:
    """A ScanNet folder, simulated HM3D scans and procedural rooms in one dataset: every scene once, keys by source."""
    scans = tmp_path / "scannet"
    room = generate_scene(9, 0, ProceduralOptions(size_range=(3.0, 4.0), max_objects=5))
    write_scannet_scan(room, scans, "scene0100_00", scan_poses(room, np.random.default_rng(1), 3))
    cfg = DataStageConfig.model_validate({
        "dataset": "InteriorFusion-Real", "seed": 3,
        "sources": [{"source": "scannet", "importer": {"path": str(scans)}},
                    {"source": "hm3d", "procedural": SMALL, "importer": {"simulate": {"num_scenes": 2, "seed": 1}}},
                    {"source": "procedural", "num_scenes": 2, "seed": 7, "procedural": SMALL}],
        "voxel": {"resolutions": [32], "cube_size": "fit"}, "render": {"views": 1, "image_size": 32},
        "splits": {"train": 0.6, "val": 0.2, "test": 0.2}, "shards": {"samples_per_shard": 2}, "preview_samples": 0})
    # The resolved config is the `sources` form only, and reads back as the same config (worker processes do).
    dumped = cfg.model_dump(mode="json")
    assert "source" not in dumped and "importer" not in dumped and DataStageConfig.model_validate(dumped) == cfg
    summary = write_dataset(LocalStore(tmp_path / "out"), cfg, tmp_path / "work")
    assert summary.dataset["source"] == "scannet+hm3d+procedural" and summary.metrics["scenes"] == 5
    keys = []
    for split in ("train", "val", "test"):
        ds = open_dataset(str(tmp_path / "out"), split, require_manifest=False)
        keys += [ds.get(i)["meta"]["key"] for i in range(len(ds))]
    # `{source}-{the single-source key}`: the simulated HM3D scenes are named NNNNN-HASH, like HM3D's.
    assert len(set(keys)) == 5 and sorted(k for k in keys if not k.startswith("hm3d-")) == [
        "procedural-scene-000000", "procedural-scene-000001", "scannet-scene0100_00-000000"]
    hm3d = sorted(k for k in keys if k.startswith("hm3d-"))
    assert len(hm3d) == 2 and all(re.fullmatch(rf"hm3d-0000{i}-[A-Za-z0-9]{{11}}-00000{i}", k) for i, k in
                                  enumerate(hm3d)), hm3d
    # Each entry's seed draws its rooms: the procedural entry's first room is generate_scene(7, 0).
    src = SceneSource(cfg, [scans, tmp_path / "work" / "simulated-1-hm3d", None])
    assert src.count == 5 and src.config(3).seed == 7 and src.config(1).seed == 3
    assert np.array_equal(src.scene(3).vertices, generate_scene(7, 0, src.parts[2].opts).vertices)


def test_bad_source_configs_are_one_clear_error(tmp_path: Path) -> None:
    multi = tmp_path / "multi.yaml"
    multi.write_text(yaml.safe_dump(MULTI))
    load_config(multi)
    sim = "{simulate: {num_scenes: 2}}"
    cases = [
        (["source=scannet", f"importer={{path: {tmp_path}, simulate: {{num_scenes: 2}}}}"],
         r"data\.yaml: importer\.simulate and importer\.path exclude each other"),
        ([f"importer={sim}"], r"data\.yaml: importer\.simulate is only for the scan sources scannet and hm3d "
                              r"\(source is 'procedural'\)"),
        (["source=meshes", f"importer={sim}"], r"importer\.simulate is only for .*\(source is 'meshes'\)"),
        (["source=hm3d", "importer={simulate: {frames: 3}}"], r"importer\.simulate\.frames: only for source scannet"),
        (["source=hm3d"], r"source 'hm3d' needs importer\.path .* or importer\.simulate"),
        (["importer.simulate.num_scenes=0"], r"importer\.simulate\.num_scenes: Input should be greater than 0"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(SMOKE, overrides)
    multi_cases = [
        (["sources=[]"], r"multi\.yaml: sources: needs at least one entry"),
        (["source=scannet"], r"multi\.yaml: sources: replaces the top-level .*; move 'source' into the entries"),
        ([f"sources.1.importer={{path: {tmp_path}, simulate: {{}}}}"],
         r"multi\.yaml: sources\.1 \(hm3d\): importer\.simulate and importer\.path exclude each other"),
        ([f"sources.1={{source: procedural, num_scenes: 2, importer: {sim}}}"],
         r"sources\.1 \(procedural\): importer\.simulate is only for the scan sources"),
        (["sources.1={source: procedural}"], r"sources\.1 \(procedural\): source 'procedural' needs num_scenes"),
        (["sources.0.importr={}"], r"multi\.yaml: sources\.0\.importr: unknown key 'importr' \(did you mean "
                                   r"'importer'"),
        (["sources.0.importer.simulate.frame=2"], r"sources\.0\.importer\.simulate\.frame: unknown key 'frame' "
                                                  r"\(did you mean 'frames'"),
        (["sources.1.source=front3d"], r"sources\.1 \(front3d\): importer\.simulate is only for"),
        (["voxel.cube_size=4.0"], r"sources\.0 \(scannet\): procedural rooms up to 5 m wide do not fit"),
    ]
    for overrides, message in multi_cases:
        with pytest.raises(ConfigError, match=message):
            load_config(multi, overrides)


def test_single_source_configs_resolve_as_before() -> None:
    """No `sources` and no `importer.simulate` in a single-source config's resolved form: configs written before
    they existed keep their digests (and so their cached runs)."""
    for path in [SMOKE, REPO / "configs" / "data.yaml"]:
        resolved = load_config(path).resolved
        assert "sources" not in resolved and "simulate" not in resolved["importer"]
        assert resolved["source"] == "procedural"
    sim = load_config(SMOKE, ["source=scannet", "importer.simulate={num_scenes: 2}"]).model
    # ScanNet's frame options are filled in (HM3D has none), and the resolved form validates back the same.
    assert sim.importer.simulate is not None and sim.importer.simulate.frames == 8
    assert DataStageConfig.model_validate(sim.model_dump(mode="json")) == sim
