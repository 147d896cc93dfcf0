"""Model builders by config kind, for the planner (and anyone who needs a model from a config alone).

    register_model_builder("vae_pretrain", build_vae, tokens_per_sample=..., activation_bytes=...)

When the planner is given measured token counts (`interiorfusion plan --tokens-from URI`, through the spec's
`tokens_from` hook), it calls `tokens_per_sample`, `flops_per_sample`, `flop_terms` and `activation_bytes` with the
phase's measured tokens per sample as the keyword `tokens=`; a spec without `tokens_from` is never called so.

Packages outside core register through the `interiorfusion.model_builders` entry-point group: the entry point's
name is the config kind and it loads a `ModelSpec` (or a plain `fn(config) -> nn.Module`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from torch import nn

from interiorfusion_core.errors import UserError

GROUP = "interiorfusion.model_builders"

# fn(config, phase) -> number; phase is a CurriculumPhase or None.
PhaseFn = Callable[[Any, Any], float]
# fn(config, phase, micro_batch, checkpointing) -> activation bytes per GPU for one micro-batch.
ActivationFn = Callable[[Any, Any, int, bool], float]
# fn(config, phase) -> training FLOPs per sample by term (e.g. linear / self_attention / cross_attention).
FlopTermsFn = Callable[[Any, Any], dict[str, float]]
# fn(model) -> parameters per named component; None: a component this build left out (reported, not counted).
ComponentsFn = Callable[[nn.Module], dict[str, int | None]]
# fn(config, uri) -> mean tokens per sample by data resolution, measured on real data (e.g. a VAE's latents).
TokensFromFn = Callable[[Any, str], dict[int, float]]


@dataclass(frozen=True)
class ModelSpec:
    kind: str
    build: Callable[[Any], nn.Module]
    # Tokens (or voxels, or samples for non-sequence models) per sample: FLOPs ≈ (4·N + 2·N_trainable)·tokens.
    tokens_per_sample: PhaseFn | None = None
    # A model's own training FLOPs per sample (forward + backward), when 6·N·tokens does not fit it.
    flops_per_sample: PhaseFn | None = None
    activation_bytes: ActivationFn | None = None
    description: str = ""
    # Training FLOPs per sample split by term; their sum is the step's FLOPs (takes precedence over
    # flops_per_sample), and activation checkpointing adds one forward (a third of the sum).
    flop_terms: FlopTermsFn | None = None
    # A model made of parts (a backbone, a second network, an encoder): the planner lists each part's parameters.
    components: ComponentsFn | None = None
    tokens_from: TokensFromFn | None = None


_builders: dict[str, ModelSpec] = {}


def register_model_builder(
    kind: str,
    build: Callable[[Any], nn.Module],
    *,
    tokens_per_sample: PhaseFn | None = None,
    flops_per_sample: PhaseFn | None = None,
    activation_bytes: ActivationFn | None = None,
    description: str = "",
    flop_terms: FlopTermsFn | None = None,
    components: ComponentsFn | None = None,
    tokens_from: TokensFromFn | None = None,
) -> ModelSpec:
    spec = ModelSpec(kind, build, tokens_per_sample, flops_per_sample, activation_bytes, description, flop_terms,
                     components, tokens_from)
    _builders[kind] = spec
    return spec


def _from_entry_points(kind: str) -> ModelSpec | None:
    for ep in entry_points(group=GROUP):
        if ep.name != kind:
            continue
        try:
            obj = ep.load()
        except Exception as exc:
            raise UserError(f"the model builder for config kind '{kind}' failed to import ({exc})") from None
        spec = obj if isinstance(obj, ModelSpec) else ModelSpec(kind, obj)
        _builders[kind] = spec
        return spec
    return None


def get_model_spec(kind: str) -> ModelSpec:
    spec = _builders.get(kind) or _from_entry_points(kind)
    if spec is None:
        known = ", ".join(sorted(_builders)) or "none"
        raise UserError(
            f"no model builder is registered for config kind '{kind}' (registered: {known}); the stage package "
            f"that trains it registers one with interiorfusion_core.engine.register_model_builder"
        )
    return spec


def registered_kinds() -> list[str]:
    return sorted(_builders)


__all__ = ["ModelSpec", "get_model_spec", "register_model_builder", "registered_kinds"]
