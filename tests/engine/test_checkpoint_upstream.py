"""`ctx.load_input_checkpoint(name)` / `checkpoint.load_stage_checkpoint`: a downstream stage loads the verified
weights and resolved config of a real trained toy stage output; a changed file, a checkpoint that is not the one
the manifest recorded, and an output without a checkpoint are one-sentence errors naming the URI."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from safetensors.torch import load_file

import interiorfusion_core.contract as contract
from interiorfusion_core.checkpoint import CheckpointError, LoadedCheckpoint, load_stage_checkpoint
from interiorfusion_core.config import LoadedConfig
from interiorfusion_core.contract import Stage, StageContext, StageInput, StageResult, run_stage
from interiorfusion_core.engine.toy import ToyEngineConfig, ToyMLP
from interiorfusion_core.errors import ChecksumError, UserError
from interiorfusion_core.manifest import read_manifest
from interiorfusion_core.registry import register_stage
from interiorfusion_core.storage import open_store
from interiorfusion_core.tracking import NullTracker

CONFIG = {
    "kind": "engine_toy", "model": {"hidden": 8}, "data": {"num_samples": 32, "val_samples": 0},
    "training": {"batch_size": 4, "max_steps": 6, "checkpoint_every": 4, "mixed_precision": "no"},
}


@register_stage
class FromToy(Stage):
    """A downstream stage that starts from the toy stage's checkpoint."""

    name = "engine-toy-downstream"
    config_kind = "engine_toy"
    config_model = ToyEngineConfig
    inputs: ClassVar[dict[str, str]] = {"init": "engine-toy"}
    loaded: ClassVar[list[LoadedCheckpoint]] = []

    def run(self, ctx: StageContext) -> StageResult:
        loaded = ctx.load_input_checkpoint("init")
        FromToy.loaded.append(loaded)
        return StageResult(metrics={"init_step": float(loaded.step)})


def config() -> LoadedConfig:
    return LoadedConfig("engine_toy", ToyEngineConfig.model_validate(CONFIG), "<test>")


@pytest.fixture
def upstream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(contract, "Tracker", NullTracker)
    out = tmp_path / "toy"
    run_stage("engine-toy", config(), output=str(out))
    return out


def test_a_downstream_stage_loads_the_upstream_checkpoint(upstream: Path, tmp_path: Path) -> None:
    FromToy.loaded.clear()
    outcome = run_stage("engine-toy-downstream", config(), inputs={"init": str(upstream)}, output=str(tmp_path / "b"))
    assert outcome.manifest.metrics["init_step"] == 6
    (loaded,) = FromToy.loaded
    manifest = read_manifest(str(upstream))
    assert loaded.key == manifest.outputs["checkpoint"] == "checkpoints/step-00000006" and loaded.step == 6
    assert loaded.uri == open_store(upstream).uri_for(loaded.key)
    assert loaded.config == manifest.config and loaded.config["training"]["max_steps"] == 6
    expected = load_file(upstream / loaded.key / "model.safetensors")
    assert loaded.state_dict.keys() == expected.keys()
    assert all(torch.equal(loaded.state_dict[k], expected[k]) for k in expected)
    ToyMLP(ToyEngineConfig.model_validate(loaded.config).model).load_state_dict(loaded.state_dict)  # strict


def test_a_changed_weight_file_is_a_checksum_error_naming_the_uri(upstream: Path, tmp_path: Path) -> None:
    weights = upstream / "checkpoints/step-00000006/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as err:
        run_stage("engine-toy-downstream", config(), inputs={"init": str(upstream)}, output=str(tmp_path / "b"))
    message = str(err.value)
    assert "checksum mismatch" in message and upstream.resolve().as_uri() in message and "\n" not in message


def upstream_input(path: Path) -> StageInput:
    store = open_store(path)
    return StageInput("init", store.uri, read_manifest(store), store)


def test_a_checkpoint_other_than_the_recorded_one_is_refused(upstream: Path) -> None:
    source = upstream_input(upstream)
    key = source.manifest.outputs["checkpoint"]
    entry = source.manifest.artifacts[f"{key}/optimizer.pt"]
    source.manifest.artifacts[f"{key}/optimizer.pt"] = entry.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(CheckpointError, match=r"'optimizer\.pt' is not the file the manifest of .* recorded"):
        load_stage_checkpoint(source)
    del source.manifest.artifacts[f"{key}/checkpoint.json"]
    with pytest.raises(UserError, match="does not list 'checkpoint.json'"):
        load_stage_checkpoint(source)


def test_an_output_without_a_checkpoint_is_one_sentence(upstream: Path) -> None:
    source = upstream_input(upstream)
    source.manifest.outputs.clear()
    with pytest.raises(UserError) as err:
        load_stage_checkpoint(source)
    assert str(err.value) == (f"{source.uri}: stage 'engine-toy' recorded no 'checkpoint' output, so there is no "
                              "checkpoint to load from it")


def test_an_unknown_input_name(upstream: Path, tmp_path: Path) -> None:
    ctx: Any = StageContext(stage="x", loaded=config(), inputs={"init": upstream_input(upstream)}, output=None,
                            tracker=NullTracker(), cache_key="k", work_dir=tmp_path)
    with pytest.raises(UserError, match="stage 'x' got no input 'base' \\(inputs: init\\)"):
        ctx.load_input_checkpoint("base")
    assert ctx.load_input_checkpoint("init", map_location="cpu").step == 6
