"""The planner: parameter count on the meta device, ZeRO memory formulas, FLOPs/step time/days/cost, the seed table,
and clear errors for kinds without a model builder."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from interiorfusion_core.config import load_config
from interiorfusion_core.engine import models
from interiorfusion_core.engine.planner import GIB, GPUS, memory_rows, plan
from interiorfusion_core.engine.toy import ToyEngineConfig, _toy_activation_bytes, build_toy_mlp
from interiorfusion_core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp: Path, text: str) -> Path:
    p = tmp / "plan.yaml"
    p.write_text(text)
    return p


TOY = """
kind: engine_toy
model: {in_dim: 64, hidden: 512, depth: 3, out_dim: 64}
training:
  batch_size: 32
  num_gpus: 8
  max_steps: 100000
  curriculum:
    - {resolution: 256, steps: 40000, lr: 1.0e-4}
    - {resolution: 512, steps: 60000, lr: 1.0e-4}
"""


def test_memory_formulas_per_zero_stage() -> None:
    n = 10**9
    rows = {(r.zero, r.checkpointing): r for r in memory_rows(n, n, 0, 8, "bf16", {False: 0.0, True: 0.0}, 80)}
    assert rows[0, False].total_gib == pytest.approx(16 * n / GIB)  # 2 + 2 + 12 bytes per parameter
    assert rows[1, False].total_gib == pytest.approx((2 + 2 + 12 / 8) * n / GIB)
    assert rows[2, False].total_gib == pytest.approx((2 + 14 / 8) * n / GIB)
    assert rows[3, False].total_gib == pytest.approx(16 / 8 * n / GIB)
    assert rows[0, False].fits is True and rows[3, False].fits is True
    fp32 = {r.zero: r for r in memory_rows(n, n, 0, 1, "no", {False: 0.0, True: 0.0}, 80)}
    assert (fp32[0].weights_gib, fp32[0].grads_gib, fp32[0].optimizer_gib) == pytest.approx(
        (4 * n / GIB, 4 * n / GIB, 8 * n / GIB))
    frozen = {r.zero: r for r in memory_rows(n, n // 10, 0, 1, "bf16", {False: None, True: None}, 80)}
    assert frozen[0].optimizer_gib == pytest.approx(12 * n / 10 / GIB)
    assert frozen[0].total_gib is None and frozen[0].fits is None  # no activation estimate → no verdict


def test_toy_plan_numbers(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, TOY))
    p = plan(loaded, gpus=8, gpu="a100-80gb", mfu=0.4)
    n = sum(x.numel() for x in build_toy_mlp(ToyEngineConfig.model_validate(loaded.model.model_dump())).parameters())
    assert p.params == p.trainable == n
    assert p.global_batch == 32 * 8
    step_flops = 6 * n * 1 * 256  # 6·N·tokens, one "token" per toy sample
    step_s = step_flops / (8 * 312e12 * 0.4)
    assert p.phases[0].tflop_per_step == pytest.approx(step_flops / 1e12)
    assert p.phases[0].step_time_s == pytest.approx(step_s)
    assert p.days == pytest.approx(step_s * 100_000 / 86400)
    assert p.gpu_hours == pytest.approx(step_s * 100_000 / 3600 * 8)
    assert p.cost == pytest.approx(p.gpu_hours * GPUS["a100-80gb"].price_per_hour)
    assert p.days_with_checkpointing == pytest.approx(p.days * 8 / 6)  # + a recomputed forward
    assert plan(loaded, gpus=8, price_per_hour=2.0).cost == pytest.approx(p.gpu_hours * 2.0)
    assert p.seed is None


class FakeDiT(nn.Module):
    """The seed's Structure DiT sizes (width 1536, 30 blocks, MLP 8192), as plain linears."""

    def __init__(self, width: int, depth: int, hidden: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"qkv": nn.Linear(width, 3 * width), "proj": nn.Linear(width, width),
                           "fc1": nn.Linear(width, hidden), "fc2": nn.Linear(hidden, width),
                           "mod": nn.Linear(width, 6 * width)})
            for _ in range(depth)
        )


def test_seed_dit_plan_beside_the_seed_table(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = models.ModelSpec(
        "dit_structure", lambda c: FakeDiT(c.model.width, c.model.depth, c.model.mlp_hidden),
        tokens_per_sample=lambda c, phase: (phase.resolution // 16) ** 3 * 0.1 if phase else 4096,
        activation_bytes=lambda c, phase, mb, ckpt: mb * 4096 * c.model.width * (2 if ckpt else 40) * c.model.depth,
    )
    monkeypatch.setitem(models._builders, "dit_structure", spec)
    p = plan(load_config(ROOT / "configs/dit_structure.yaml"), gpu="h100-80gb")
    assert p.gpus == 32 and p.global_batch == 256
    assert 1.2e9 < p.params < 1.5e9  # ~1.3B, as the seed says
    assert p.seed == {"stage": "Structure DiT", "gpus": 32, "gpu": "A100 80GB", "days": 14, "cost": 30_000,
                      "implied_price_per_gpu_hour": pytest.approx(30_000 / (32 * 14 * 24))}
    zero3 = next(r for r in p.memory if r.zero == 3 and r.checkpointing)
    zero0 = next(r for r in p.memory if r.zero == 0 and not r.checkpointing)
    assert zero3.total_gib < zero0.total_gib
    assert [r.resolution for r in p.phases] == [256, 512, 1024]
    assert p.phases[2].step_time_s > p.phases[0].step_time_s  # more latent tokens at 1024


def test_kinds_without_a_builder_fail_clearly() -> None:
    with pytest.raises(UserError, match="no model builder is registered for config kind 'dit_material'"):
        plan(load_config(ROOT / "configs/dit_material.yaml"))


def test_the_seed_vae_plans_on_its_hardware() -> None:
    p = plan(load_config(ROOT / "configs/vae_pretrain.yaml"), gpus=8, gpu="a100-80gb")
    assert 1e7 < p.params < 1e9
    assert [r.resolution for r in p.phases] == [256, 512, 1024]
    # Sparse cost follows surface voxels (≈ N²): each doubling of resolution ≈ 4× the step time.
    ratio = p.phases[1].step_time_s / p.phases[0].step_time_s
    assert 3.5 < ratio < 4.5


def test_unknown_gpu(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown GPU"):
        plan(load_config(write(tmp_path, TOY)), gpu="v100")


def test_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from interiorfusion_flows.cli import app

    config = write(tmp_path, TOY)
    result = CliRunner().invoke(app, ["plan", str(config), "--gpus", "4", "--gpu", "rtx-4090",
                                      "--price-per-hour", "0.5"])
    assert result.exit_code == 0, result.output
    out: Any = " ".join(result.output.split())  # rich wraps at 80 columns
    assert "4× RTX 4090 24GB" in out and "memory per GPU" in out and "estimate" in out and "$0.50" in out
    bad = CliRunner().invoke(app, ["plan", str(ROOT / "configs/dit_material.yaml")])
    assert bad.exit_code == 1 and "no model builder" in bad.output


def test_meta_device_build_allocates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 0.5B-parameter toy (2 GiB in fp32) is planned from shapes alone: the builder runs on the meta device
    (no storage behind any parameter), the counts equal the MLP's own formula, and the memory rows follow from
    them and the toy's activation estimate."""
    built: list[nn.Module] = []
    spec = models.get_model_spec("engine_toy")

    def build(config: Any) -> nn.Module:
        built.append(spec.build(config))
        return built[-1]

    monkeypatch.setitem(models._builders, "engine_toy", dataclasses.replace(spec, build=build))
    loaded = load_config(write(tmp_path, TOY.replace("hidden: 512", "hidden: 16384")))
    p = plan(loaded, gpus=8)
    (model,) = built
    assert all(t.is_meta for t in model.parameters())  # nothing was allocated
    m, t = loaded.model.model, loaded.model.training
    h = m.hidden
    n = (m.in_dim + 1) * h + (m.depth - 1) * (h + 1) * h + (h + 1) * m.out_dim  # Linear layers: (in + 1) × out
    assert p.params == p.trainable == n and p.largest_tensor == h * h and n > 5e8
    act = _toy_activation_bytes(loaded.model, None, t.batch_size, False)
    rows = {(r.zero, r.checkpointing): r for r in p.memory}
    zero0, zero3 = rows[0, False], rows[3, False]
    assert p.precision == "bf16"  # the config's (default) mixed precision, whatever this machine has
    assert (zero0.weights_gib, zero0.grads_gib, zero0.optimizer_gib) == pytest.approx(
        (2 * n / GIB, 2 * n / GIB, 12 * n / GIB))
    assert zero0.activations_gib == pytest.approx(act / GIB) and act > 0
    assert zero3.weights_gib == pytest.approx((2 * n / 8 + 4 * h * h) / GIB)  # + the gather buffer
    assert zero3.total_gib == pytest.approx(zero3.weights_gib + 2 * n / 8 / GIB + 12 * n / 8 / GIB + act / GIB)


def test_generic_hooks_components_terms_and_measured_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model of parts registers components (one left out of the build), FLOPs by term, and a tokens_from hook:
    the plan lists the parts, sums the terms per phase and feeds measured tokens to every estimate as tokens=."""
    seen: list[float | None] = []

    def terms(c: Any, phase: Any, tokens: float | None = None) -> dict[str, float]:
        seen.append(tokens)
        n = tokens if tokens is not None else 100.0
        return {"linear": 6.0 * n, "attention": 3.0 * n * n}

    spec = models.ModelSpec(
        "engine_toy", lambda c: nn.Linear(4, 4), tokens_per_sample=lambda c, phase, tokens=None: tokens or 100.0,
        flop_terms=terms, components=lambda m: {"body": 20, "encoder": None},
        tokens_from=lambda c, uri: {512: 1000.0},
    )
    monkeypatch.setitem(models._builders, "engine_toy", spec)
    loaded = load_config(write(tmp_path, TOY))
    p = plan(loaded, gpus=8, tokens_from="data://x")
    assert p.components == {"body": 20, "encoder": None} and any("encoder" in n for n in p.notes)
    first, second = p.phases
    assert (first.tokens_source, second.tokens_source) == ("estimate", "measured")
    assert second.tokens_per_sample == 1000.0 and 1000.0 in seen
    assert second.tflop_terms == pytest.approx({"linear": 6e3 * 256 / 1e12, "attention": 3e6 * 256 / 1e12})
    assert second.tflop_per_step == pytest.approx(sum(second.tflop_terms.values()))
    assert p.days_with_checkpointing == pytest.approx(p.days * 4 / 3)  # + one forward: a third of the terms
    monkeypatch.setitem(models._builders, "engine_toy", dataclasses.replace(spec, tokens_from=None))
    with pytest.raises(UserError, match="no tokens_from hook"):
        plan(loaded, tokens_from="data://x")
