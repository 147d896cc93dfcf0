"""LoRA adapters on the smoke Structure DiT: exactly the targeted layers, only adapters train, the merged weights
and the saved adapters give the adapted network's outputs, and disabled adapters give the base network's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from testservers import REPO

from interiorfusion_core.config import load_config
from interiorfusion_core.errors import UserError
from interiorfusion_finetune.adapters import (
    adapter_parameters,
    adapters_disabled,
    load_adapters,
    merged_state_dict,
    save_adapters,
    targeted_modules,
    wrap,
)
from interiorfusion_finetune.config import LoRAConfig
from interiorfusion_structure.attention import Segments
from interiorfusion_structure.conditions import ConditionTokens
from interiorfusion_structure.lifting import CHANNELS as LIFT_CHANNELS
from interiorfusion_structure.model import FlowInput, StructureModel

CHANNELS = 8
WIDTH = load_config(REPO / "configs/smoke/structure.yaml").model.model.conditioning.width


def _base() -> StructureModel:
    """The smoke DiT, its zero-initialised output layers made non-zero (a trained network's are), same every call."""
    torch.manual_seed(0)
    cfg = load_config(REPO / "configs/smoke/structure.yaml").model
    model = StructureModel(cfg, CHANNELS).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _velocity(model: torch.nn.Module) -> torch.Tensor:
    """The latent flow's velocity on fixed tokens, with the pooled/cross-attention context of a zero condition."""
    g = torch.Generator().manual_seed(1)
    coords = torch.cat([torch.zeros(6, 1, dtype=torch.int32), torch.randint(0, 4, (6, 3), generator=g).int()], 1)
    x = torch.randn(6, CHANNELS, generator=g)
    t = torch.tensor([0.3])
    width = WIDTH
    cond = ConditionTokens(torch.randn(3, width, generator=g), torch.tensor([3]), torch.randn(1, width, generator=g),
                           torch.zeros(3, dtype=torch.long))
    with torch.no_grad():
        lifted = torch.rand(6, LIFT_CHANNELS, generator=g)
        return model.velocity("latent", FlowInput(x, coords, Segments.from_lengths([6]), t, lifted), cond)


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Non-zero B matrices (peft starts them at zero: a fresh adapter is an exact no-op)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in adapter_parameters(model).items():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_wraps_exactly_the_targets_and_trains_only_adapters() -> None:
    base = _base()
    cfg = LoRAConfig(rank=4, alpha=8)
    expected = {f"{flow}.blocks.{i}.{m}" for flow in ("latent", "occupancy") for i in range(len(base.latent.blocks))
                for m in ("attention.qkv", "attention.proj", "mlp.fc1", "mlp.fc2")}
    assert set(targeted_modules(base, cfg)) == expected
    wrapped = wrap(base, cfg, "structure")
    adapted = {n.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for n in adapter_parameters(wrapped)}
    assert adapted == expected  # no cross-attention, condition encoder or embedding layer got an adapter
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(wrapped)) and trainable
    # rank 4: A is [4, in], B is [out, 4]
    qkv = dict(wrapped.named_parameters())["base_model.model.latent.blocks.0.attention.qkv.lora_A.default.weight"]
    assert qkv.shape == (4, base.latent.blocks[0].attention.qkv.in_features)


def test_a_target_that_matches_nothing_is_one_clear_error() -> None:
    with pytest.raises(UserError, match=r"lora.target_modules \['attn.to_q'\] match no linear layer"):
        wrap(_base(), LoRAConfig(target_modules=["attn.to_q"]), "structure")


def test_fresh_adapters_are_the_base_and_disabled_adapters_are_the_base() -> None:
    base_out = _velocity(_base())
    wrapped = wrap(_base(), LoRAConfig(rank=4, alpha=8), "structure")
    assert torch.equal(_velocity(wrapped), base_out)
    _perturbed(wrapped)
    tuned = _velocity(wrapped)
    assert (tuned - base_out).abs().max() > 1e-4  # the adapters do change the output
    with adapters_disabled(wrapped):
        assert torch.equal(_velocity(wrapped), base_out)


def test_merged_and_saved_adapters_give_the_adapted_outputs(tmp_path: Path) -> None:
    cfg = LoRAConfig(rank=4, alpha=8)
    wrapped = _perturbed(wrap(_base(), cfg, "structure"))
    tuned = _velocity(wrapped)
    merged = _base()
    merged.load_state_dict(merged_state_dict(wrapped))  # the base class's keys: any loader of stage 2 reads it
    torch.testing.assert_close(_velocity(merged), tuned, rtol=1e-5, atol=1e-6)
    files = save_adapters(wrapped, tmp_path / "adapters")
    assert {p.name for p in files} == {"adapter_model.safetensors", "adapter_config.json", "README.md"} or \
        {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in files}
    reloaded = load_adapters(_base(), tmp_path / "adapters")
    torch.testing.assert_close(_velocity(reloaded), tuned, rtol=1e-6, atol=1e-7)
    # the adapted model itself is untouched by the merge
    torch.testing.assert_close(_velocity(wrapped), tuned, rtol=0, atol=0)
