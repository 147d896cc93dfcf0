"""The structure DiT's planner: parameters per component, attention FLOPs from token counts, full vs windowed
attention, measured tokens from a VAE output's latent index, and the CLI on the seed config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import interiorfusion_structure.planning as planning
from interiorfusion_core.config import load_config
from interiorfusion_core.engine.planner import plan
from interiorfusion_structure.planning import dit_forward_flops

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "configs/dit_structure.yaml"


def test_seed_latent_dit_has_the_seeds_size() -> None:
    p = plan(load_config(SEED))
    assert p.components is not None
    assert 1.2e9 <= p.components["latent DiT"] <= 1.4e9  # the seed's "~1.3B"
    assert 0 < p.components["occupancy DiT"] < 0.2e9
    assert "condition encoder" in p.components  # None until the encoder can be built here
    built = sum(n for n in p.components.values() if n is not None)
    assert p.params == built


def test_attention_and_linear_flops_per_block_at_interior_scale() -> None:
    # One block's forward on 24k latent tokens at the seed's width: the T² term is twice the linear layers.
    f = dit_forward_flops(24_000, 1536, 1, 8192, cond_tokens=0)
    assert f["self_attention"] == pytest.approx(3.5e12, rel=0.02)
    assert 1.7e12 <= f["linear"] <= 1.9e12
    windowed = dit_forward_flops(24_000, 1536, 1, 8192, cond_tokens=0, window_tokens=512)
    assert windowed["self_attention"] == pytest.approx(f["self_attention"] * 512 / 24_000)
    assert windowed["linear"] == f["linear"]


def test_windowed_attention_plans_cheaper_at_1024() -> None:
    full = plan(load_config(SEED))
    window = plan(load_config(SEED, ("model.attention.kind=window",)))
    assert [r.resolution for r in full.phases] == [256, 512, 1024]
    f, w = full.phases[2], window.phases[2]
    assert w.step_time_s < 0.5 * f.step_time_s
    assert f.tflop_terms["latent_self_attention"] > f.tflop_terms["latent_linear"]  # T² dominates at 1024
    assert w.tflop_terms["latent_self_attention"] < 0.1 * w.tflop_terms["latent_linear"]
    assert w.tflop_terms["latent_linear"] == pytest.approx(f.tflop_terms["latent_linear"])
    assert window.days < full.days and window.cost < full.cost
    assert sum(f.tflop_terms.values()) == pytest.approx(f.tflop_per_step)


def _write_latents(root: Path, tokens: dict[int, list[int]]) -> None:
    """A VAE output's latent index (index.json + one shard index per resolution), no shard data: planning reads
    token counts from the indexes alone."""
    L = 2
    index: dict[str, Any] = {"format": "interiorfusion.latents/2", "latent_dim": L, "compression": 16,
                             "target_resolution": max(tokens), "resolutions": {}}
    for res, counts in tokens.items():
        key = f"latents/{res}/train/shard-r0-0.json"
        samples = [{"position": i, "index": i, "key": f"s{i}", "offset": 0, "size": 0, "sha256": "", "tokens": n,
                    "origin": [0.0, 0.0, 0.0], "cube_size": 1.0} for i, n in enumerate(counts)]
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_text(json.dumps({"format": index["format"], "shard": key.replace(".json", ".safetensors"),
                                            "samples": samples}))
        index["resolutions"][str(res)] = {
            "resolution": res, "latent_resolution": res // 16,
            "normalization": {"split": "train", "tokens": sum(counts), "mean": [0.0] * 2 * L, "std": [1.0] * 2 * L},
            "splits": {"train": {"samples": len(counts), "tokens": sum(counts), "shards": [{"index": key}]}}}
    (root / "latents/index.json").write_text(json.dumps(index))


def test_tokens_from_a_vae_output(tmp_path: Path) -> None:
    _write_latents(tmp_path, {512: [6000, 8000], 1024: [30000, 34000]})
    assert planning.latent_tokens_from(None, str(tmp_path)) == {512: 7000.0, 1024: 32000.0}
    estimate = plan(load_config(SEED))
    measured = plan(load_config(SEED), tokens_from=str(tmp_path))
    by_res = {r.resolution: r for r in measured.phases}
    assert by_res[1024].tokens_per_sample == 32000 and by_res[1024].tokens_source == "measured"
    assert by_res[256].tokens_source == "estimate"  # no latents at 256: the estimate, with a note
    assert any("resolution(s) 256" in n for n in measured.notes)
    assert by_res[1024].step_time_s > estimate.phases[2].step_time_s  # 32k > the 28.7k estimate


def test_cli_plans_the_seed_config_full_and_windowed() -> None:
    from typer.testing import CliRunner

    from interiorfusion_flows.cli import app

    for extra in ([], ["--set", "model.attention.kind=window"]):
        result = CliRunner().invoke(app, ["plan", str(SEED), *extra])
        assert result.exit_code == 0, result.output
        out = " ".join(result.output.split())
        assert "latent DiT 1,342,525,504" in out and "occupancy DiT" in out
        assert "latent self attention" in out and "seed table" in out and "estimate" in out
