"""LoRA adapters on the DiTs with peft: wrap, disable (the frozen reference), save, load and merge.

The base network is frozen (peft sets requires_grad False on everything but the adapters); the adapters start as
an exact no-op (peft's default init: A random, B zero), so step 0 of a fine-tune *is* the base model. Adapters are
written with `save_pretrained` (adapter_model.safetensors + adapter_config.json, peft's own layout: any peft user
can read them) and, merged, as a plain state dict of the base class, which every loader of that stage reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from interiorfusion_core.errors import UserError
from interiorfusion_finetune.config import LoRAConfig

ADAPTER = "default"  # peft's adapter name; one adapter per network


def lora_config(cfg: LoRAConfig) -> object:
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), bias="none")


def targeted_modules(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Names of the nn.Linear modules of `model` that the targets match (peft's rule: the name equals a target or
    ends with `.` + target)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
            and any(n == t or n.endswith(f".{t}") for t in cfg.target_modules)]


def wrap(model: nn.Module, cfg: LoRAConfig, what: str) -> nn.Module:
    """`model` with LoRA adapters on its targeted linear layers and everything else frozen (a peft PeftModel whose
    attribute access falls through to `model`). A target list that matches nothing is one error naming it."""
    from peft import get_peft_model

    if not targeted_modules(model, cfg):
        raise UserError(f"lora.target_modules {list(cfg.target_modules)} match no linear layer of the {what} DiT "
                        "(its blocks name them attention.qkv, attention.proj, mlp.fc1, mlp.fc2)")
    return get_peft_model(model, lora_config(cfg))


def adapter_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The base network (the reference policy, the baseline): the same module with its adapters switched off, no
    second copy of the weights."""
    peft_model = find_peft(model)
    with peft_model.disable_adapter():
        yield


def find_peft(model: nn.Module) -> nn.Module:
    from peft import PeftModel

    for m in model.modules():
        if isinstance(m, PeftModel):
            return m
    raise TypeError("the model carries no LoRA adapters")


def save_adapters(model: nn.Module, folder: Path) -> list[Path]:
    """peft's save_pretrained of the adapters only (safetensors). Returns the files written."""
    find_peft(model).save_pretrained(str(folder), safe_serialization=True)
    return sorted(p for p in folder.rglob("*") if p.is_file())


def load_adapters(base: nn.Module, folder: Path, cfg: LoRAConfig | None = None) -> nn.Module:
    """`base` with the adapters saved in `folder` (frozen, inference)."""
    from peft import PeftModel

    if not (folder / "adapter_config.json").exists():
        raise UserError(f"{folder}: no adapter_config.json here (not a saved LoRA adapter)")
    return PeftModel.from_pretrained(base, str(folder), is_trainable=False)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base class's state dict with W + (alpha/r)·B·A folded into every adapted layer, on a copy (the adapted
    model is left as it is)."""
    import copy

    merged = copy.deepcopy(find_peft(model)).merge_and_unload()
    return {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}


__all__ = ["adapter_parameters", "adapters_disabled", "find_peft", "load_adapters", "lora_config",
           "merged_state_dict", "save_adapters", "targeted_modules", "wrap"]
