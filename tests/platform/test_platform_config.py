"""Config schemas: the seed's files load as written; stages own their schemas (entry points, no torch); errors are
one line naming file and key; duplicated keys and out-of-range values are refused."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from interiorfusion_core.config import config_kinds, load_config, stage_specs
from interiorfusion_core.errors import ConfigError
from interiorfusion_finetune.config import RLFinetuneConfig
from interiorfusion_structure.config import DiTModelConfig, FlowMatchingConfig

REPO = Path(__file__).resolve().parents[2]
SEED = ["vae_pretrain", "dit_structure", "dit_material", "finetune_lora", "rl_finetune"]
PY = sys.executable


@pytest.mark.parametrize("name", SEED)
def test_seed_configs_load_as_written_and_detect_their_kind(name: str) -> None:
    text = (REPO / "configs" / f"{name}.yaml").read_text()
    assert "kind:" not in text  # detected from content, as the seed writes them
    assert load_config(REPO / "configs" / f"{name}.yaml").kind == name


def test_config_digest_is_the_sha256_of_the_resolved_config() -> None:
    digests = {}
    for name in SEED:
        loaded = load_config(REPO / "configs" / f"{name}.yaml")
        canonical = json.dumps(loaded.resolved, sort_keys=True, separators=(",", ":")).encode()
        assert loaded.digest == hashlib.sha256(canonical).hexdigest()
        digests[name] = loaded.digest
    assert len(set(digests.values())) == len(SEED)


def test_each_stage_package_owns_its_schema() -> None:
    kinds = config_kinds()
    assert kinds["vae_pretrain"].__module__ == "interiorfusion_vae.config"
    assert kinds["data"].__module__ == "interiorfusion_data.config"
    assert kinds["dit_structure"].__module__ == "interiorfusion_structure.config"
    assert kinds["dit_material"].__module__ == "interiorfusion_material.config"
    assert kinds["finetune_lora"].__module__ == kinds["rl_finetune"].__module__ == "interiorfusion_finetune.config"
    assert kinds["pipeline"].__module__.startswith("interiorfusion_core.config")
    specs = stage_specs()
    assert specs["vae"].inputs == {"data": "data"} and specs["vae"].config_kind == "vae_pretrain"


def test_seed_values_survive_validation() -> None:
    vae = load_config(REPO / "configs/vae_pretrain.yaml").model
    assert vae.model.latent_dim == 64 and vae.training.max_steps == 200_000
    assert [p.resolution for p in vae.training.curriculum] == [256, 512, 1024]
    assert vae.training.curriculum[2].lr == 5.0e-5
    assert vae.loss.edge_preservation.weight == 0.2
    # target_resolution is what the latent describes: 1024³ / 16 = the seed's 64³ latent.
    assert vae.model.latent_resolution == 64 and vae.first_resolution == 256
    dit = load_config(REPO / "configs/dit_structure.yaml").model
    assert dit.model.mlp_hidden == 8192 and dit.model.width == 1536
    assert dit.training.global_batch_size == 256
    lora = load_config(REPO / "configs/finetune_lora.yaml").model
    assert lora.base_lr == 1.0e-5  # training.lr replaces optimizer.lr
    rl = load_config(REPO / "configs/rl_finetune.yaml").model
    assert rl.training.max_steps == rl.training.num_iterations == 10000 and rl.base_lr == 1.0e-6


def test_edm_names_keep_their_meaning_on_the_rectified_flow() -> None:
    fm = FlowMatchingConfig()  # the seed's sigma_min 0.001, sigma_max 80
    t_min, t_max = fm.t_range
    assert t_min == pytest.approx(1 / 81) and t_max == pytest.approx(1 / 1.001)
    # σ = (1 − t) / t at the ends is the configured noise-to-signal ratio.
    assert (1 - t_min) / t_min == pytest.approx(80.0) and (1 - t_max) / t_max == pytest.approx(0.001)


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
    p = _write(tmp_path, {"model": {"latent_dim": 8, "target_resolution": 100}})
    with pytest.raises(ConfigError, match=r"model: resolution must be a power of two .*halve"):
        load_config(p)


VAE = {"kind": "vae_pretrain", "model": {"latent_dim": 8, "channels": [8, 16, 32], "target_resolution": 64}}


@pytest.mark.parametrize(("change", "message"), [
    ({"optimizer": {"betas": [0.9, 1.0]}}, r"optimizer\.betas\.1: Input should be less than 1"),
    ({"training": {"ema": {"decay": 1.0}}}, r"training\.ema\.decay: Input should be less than 1"),
    ({"model": {"latent_dim": 8, "channels": [8, 16, 32, 64, 64, 64, 64], "target_resolution": 64}},
     r"target_resolution 64 is too small for 7 levels"),
    ({"training": {"max_steps": 20, "curriculum": [{"resolution": 32, "steps": 10, "lr": 1e-3},
                                                   {"resolution": 128, "steps": 10, "lr": 1e-3}]}},
     r"target_resolution 64 must equal the last curriculum phase's resolution 128"),
    ({"model": {"latent_dim": 8, "base_resolution": 32, "target_resolution": 64}},
     r"base_resolution 32 differs from target_resolution 64 but there is no training\.curriculum"),
    ({"loss": {"normal_consistency": {"type": "l1"}}}, r"loss\.normal_consistency\.type: Input should be 'cosine'"),
    ({"loss": {"kl_divergence": {"type": "l1"}}}, r"loss\.kl_divergence\.type: unknown key 'type'"),
    ({"data": {"weight": 0.5}}, r"data\.weight: unknown key 'weight'"),
])
def test_out_of_range_and_meaningless_values_are_refused(tmp_path: Path, change: dict, message: str) -> None:
    cfg = {**VAE, **change}
    if "model" not in change:
        cfg["model"] = VAE["model"]
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, cfg))


@pytest.mark.parametrize(("kind", "change", "message"), [
    ("dit_structure", {"flow_matching": {"sigma_min": 1.0, "sigma_max": 0.5}}, r"sigma_min 1\.0 must be below"),
    ("dit_structure", {"model": {"width": 64, "num_heads": 5}}, r"width 64 is not divisible by num_heads 5"),
    ("dit_material", {"loss": {"perceptual": {"network": "resnet"}}}, r"loss\.perceptual\.network"),
    ("dit_material", {"loss": {"albedo": {"network": "vgg"}}}, r"loss\.albedo\.network: unknown key"),
    ("finetune_lora", {"lora": {"dropout": 1.0}}, r"lora\.dropout: Input should be less than 1"),
    ("rl_finetune", {"rl": {"group_size": 1}}, r"rl\.group_size: Input should be greater than or equal to 2"),
    ("rl_finetune", {"rl": {"reward_weights": {"depth_consistency": 0, "point_cloud_consistency": 0,
                                               "pose_stability": 0, "edit_quality": 0}}},
     r"at least one reward weight must be positive"),
    ("rl_finetune", {"training": {"num_iterations": 5, "max_steps": 6}}, r"num_iterations and training\.max_steps"),
    ("accelerate", {"deepspeed_config": {"zero_stage": 2}, "machine_rank": 2, "num_machines": 2},
     r"machine_rank 2 must be below num_machines 2"),
])
def test_range_checks_of_every_kind(tmp_path: Path, kind: str, change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, {"kind": kind, **change}))


def test_duplicated_key_names_file_key_and_both_lines(tmp_path: Path) -> None:
    p = tmp_path / "dup.yaml"
    p.write_text("kind: vae_pretrain\nmodel:\n  latent_dim: 8\ntraining:\n  max_steps: 10\n  batch_size: 2\n"
                 "  max_steps: 20\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(err.value) == (f"{p}: line 7: key 'max_steps' is given twice (also on line 5); YAML would silently "
                              "keep the last one, so remove one of them")
    from interiorfusion_flows.cli import app

    res = CliRunner().invoke(app, ["config", "check", str(p)])
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0 and "line 7" in res.output
    q = _write(tmp_path, {"kind": "vae_pretrain", "optimizer": {"betas": [0.9, 1.0]}}, "range.yaml")
    res = CliRunner().invoke(app, ["config", "check", str(q)])
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0 and "optimizer.betas.1" in res.output


def test_seed_accelerate_key_is_explained(tmp_path: Path) -> None:
    p = _write(tmp_path, {"distributed_type": "DEEPSPEED", "deep_speed_config": {"zero_stage": 3}})
    with pytest.raises(ConfigError, match=r"deep_speed_config: unknown key .*did you mean 'deepspeed_config'"):
        load_config(p)


def test_kind_detection_picks_the_schema_that_accepts_the_file(tmp_path: Path) -> None:
    # Both DiT kinds have model.width and flow_matching; the loss keys tell them apart.
    material = {"model": {"width": 64, "num_heads": 4}, "flow_matching": {}, "loss": {"albedo": {"weight": 2}}}
    assert load_config(_write(tmp_path, material)).kind == "dit_material"
    structure = {"model": {"width": 64, "num_heads": 4}, "flow_matching": {}}
    assert load_config(_write(tmp_path, structure)).kind == "dit_structure"
    # A material file with a typo is reported as the material file it is, not as a structure file.
    bad = {**material, "loss": {"albedo": {"weight": 2}, "renderng": {"weight": 1}}}
    with pytest.raises(ConfigError, match=r"loss\.renderng: unknown key .*did you mean 'rendering'"):
        load_config(_write(tmp_path, bad))


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


# ---------------------------------------------------------------------------------------------- import cost
CHECK_PROGRAM = textwrap.dedent("""
    import sys, time
    t0 = time.perf_counter()
    from interiorfusion_flows.cli import app
    try:
        app(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
    heavy = sorted(m for m in ("torch", "mlflow", "prefect", "interiorfusion_vae.model", "interiorfusion_data.render")
                   if m in sys.modules)
    print("RESULT", code, len(sys.modules), time.perf_counter() - t0, ",".join(heavy))
""")


def test_config_check_imports_no_torch_and_no_stage_code() -> None:
    files = [str(REPO / "configs/smoke/pipeline.yaml"), *(str(REPO / "configs" / f"{n}.yaml") for n in SEED)]
    res = subprocess.run([PY, "-c", CHECK_PROGRAM, "config", "check", *files], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT"))
    _, code, modules, _seconds, heavy = [*line.split(" "), ""][:5]
    assert code in ("0", "None"), res.stdout + res.stderr
    assert heavy == "", f"config check imported {heavy}"
    assert int(modules) < 800  # ~1,900 when it imported torch and every stage


def test_a_broken_stage_package_reports_its_real_error(tmp_path: Path) -> None:
    """A schema module that fails to import is named with its error, never reported as an unknown kind."""
    site = tmp_path / "site"
    (site / "brokenstage").mkdir(parents=True)
    (site / "brokenstage" / "__init__.py").write_text("")
    (site / "brokenstage" / "config.py").write_text("import does_not_exist_anywhere\n")
    dist = site / "interiorfusion_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: interiorfusion-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[interiorfusion.configs]\nbroken_kind = brokenstage.config:Cfg\n")
    cfg = _write(tmp_path, {"kind": "broken_kind"})
    env = {**os.environ, "PYTHONPATH": str(site)}
    res = subprocess.run([PY, "-m", "interiorfusion_flows", "config", "check", str(cfg)], capture_output=True,
                         text=True, timeout=120, env=env, cwd=REPO)
    assert res.returncode == 2
    assert "config kind 'broken_kind' is installed but its schema brokenstage.config:Cfg failed to import " \
           "(ModuleNotFoundError: No module named 'does_not_exist_anywhere')" in res.stderr + res.stdout
    assert "unknown kind" not in res.stderr + res.stdout
    # The other kinds still load.
    ok = subprocess.run([PY, "-m", "interiorfusion_flows", "config", "check", str(REPO / "configs/vae_pretrain.yaml")],
                        capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
