"""Config schemas: the seed's files load as written; errors are one line naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from interiorfusion_core.config import load_config
from interiorfusion_core.config.schemas import DiTModelConfig, RLFinetuneConfig
from interiorfusion_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SEED = ["vae_pretrain", "dit_structure", "dit_material", "finetune_lora", "rl_finetune"]


@pytest.mark.parametrize("name", SEED)
def test_seed_configs_load_as_written_and_detect_their_kind(name: str) -> None:
    loaded = load_config(REPO / "configs" / f"{name}.yaml")
    assert loaded.kind == name
    assert len(loaded.digest) == 64


def test_seed_values_survive_validation() -> None:
    vae = load_config(REPO / "configs/vae_pretrain.yaml").model
    assert vae.model.latent_dim == 64 and vae.training.max_steps == 200_000
    assert [p.resolution for p in vae.training.curriculum] == [256, 512, 1024]
    assert vae.training.curriculum[2].lr == 5.0e-5
    assert vae.loss.edge_preservation.weight == 0.2
    dit = load_config(REPO / "configs/dit_structure.yaml").model
    assert dit.model.mlp_hidden == 8192 and dit.model.width == 1536
    assert dit.training.global_batch_size == 256


def test_mlp_ratio_small_values_are_ratios() -> None:
    assert DiTModelConfig(width=64, num_heads=4, mlp_ratio=4).mlp_hidden == 256


def test_vggt_owner_is_resolved() -> None:
    rl = load_config(REPO / "configs/rl_finetune.yaml").model
    assert isinstance(rl, RLFinetuneConfig)
    assert rl.rl.vggt_model == "microsoft/VGGT-1B"
    assert rl.rl.resolved_vggt_model == "facebook/VGGT-1B"


def test_accelerate_config_is_accepted_by_accelerate_itself() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(REPO / "configs/accelerate_deepspeed.yaml"))
    assert cfg.deepspeed_config["zero_stage"] == 3
    assert cfg.deepspeed_config["gradient_clipping"] == 1.0
    assert cfg.deepspeed_config["offload_optimizer_device"] == "none"
    assert load_config(REPO / "configs/accelerate_deepspeed.yaml").kind == "accelerate"


def _write(tmp_path: Path, data: dict, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_unknown_key_names_file_key_and_suggestion(tmp_path: Path) -> None:
    p = _write(tmp_path, {"model": {"latent_dim": 8}, "optimizer": {"lrr": 1e-4}})
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(err.value) == f"{p}: optimizer.lrr: unknown key 'lrr' (did you mean 'lr'?)"


def test_wrong_type_and_range(tmp_path: Path) -> None:
    p = _write(tmp_path, {"model": {"latent_dim": "big"}})
    with pytest.raises(ConfigError, match=r"model\.latent_dim: .*integer"):
        load_config(p)
    p = _write(tmp_path, {"model": {"latent_dim": 8}, "optimizer": {"lr": -1}})
    with pytest.raises(ConfigError, match=r"optimizer\.lr: .*greater than 0"):
        load_config(p)
    p = _write(tmp_path, {"model": {"latent_dim": 8, "base_resolution": 100}})
    with pytest.raises(ConfigError, match=r"model\.base_resolution: resolution must be one of"):
        load_config(p)


def test_seed_accelerate_key_is_explained(tmp_path: Path) -> None:
    p = _write(tmp_path, {"distributed_type": "DEEPSPEED", "deep_speed_config": {"zero_stage": 3}})
    with pytest.raises(ConfigError, match=r"deep_speed_config: unknown key .*did you mean 'deepspeed_config'"):
        load_config(p)


def test_overrides_apply_and_are_validated() -> None:
    path = REPO / "configs/vae_pretrain.yaml"
    loaded = load_config(path, ["training.curriculum.2.lr=1e-5", "model.latent_dim=16"])
    assert loaded.model.training.curriculum[2].lr == 1e-5 and loaded.model.model.latent_dim == 16
    assert loaded.digest != load_config(path).digest
    with pytest.raises(ConfigError, match=r"model\.latnt_dim: unknown key"):
        load_config(path, ["model.latnt_dim=3"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["model.latent_dim"])
    with pytest.raises(ConfigError, match="list index out of range"):
        load_config(path, ["training.curriculum.7.lr=1"])


def test_consistency_checks(tmp_path: Path) -> None:
    p = _write(tmp_path, {"model": {"latent_dim": 8}, "training": {"batch_size": 2, "num_gpus": 2,
                                                                 "effective_batch_size": 5}})
    with pytest.raises(ConfigError, match="effective_batch_size 5"):
        load_config(p)


def test_unknown_kind_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p = _write(tmp_path, {"foo": 1})
    with pytest.raises(ConfigError, match="cannot tell which kind"):
        load_config(p)
    p = _write(tmp_path, {"kind": "vae_pretrian"})
    with pytest.raises(ConfigError, match="did you mean 'vae_pretrain'"):
        load_config(p)


def test_digest_is_stable_and_default_sensitive(tmp_path: Path) -> None:
    a = _write(tmp_path, {"model": {"latent_dim": 8}}, "a.yaml")
    b = _write(tmp_path, {"model": {"latent_dim": 8}, "optimizer": {"lr": 1.0e-4}}, "b.yaml")
    # Writing a default explicitly does not change what runs, so it must not change the digest.
    assert load_config(a).digest == load_config(b).digest
