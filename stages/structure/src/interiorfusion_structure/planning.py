"""What the planner needs to know about stage 2: tokens, FLOPs (attention counted) and activations per sample.

An interior is not an object: at 1024³ a room has ~6 M surface voxels, so its 64³ latent grid has ~24–40k
occupied cells (an object in TRELLIS.2 has ~4k). Tokens grow with the surface, ∝ R² for a latent grid R³;
`TOKENS_PER_R2` is fitted to that range (7 · 64² = 28.7k). With full attention the T² term dominates the step
at that size; windowed attention replaces T keys per query by the tokens of one window.

`STRUCTURE_MODEL` registers kind `dit_structure` with the planner (`interiorfusion plan configs/dit_structure.yaml`):
parameters per component (latent DiT, occupancy DiT, condition encoder where it can be built), FLOPs by term,
activations; `--tokens-from <VAE output URI>` replaces the token estimate by the latents' mean tokens per sample at
each resolution. Every function here takes `tokens=` (the planner passes measured tokens that way).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from interiorfusion_core.engine.models import register_model_builder
from interiorfusion_structure.attention import attention_flops, mean_window_tokens

TOKENS_PER_R2 = 7.0
VAE_COMPRESSION = 16  # the seed VAE's 4 downsamplings (stages/vae); latent grid R = N / 16
LAYOUT_TOKENS = 64  # statements of a furnished room (walls, openings, boxes); bounded by max_layout_tokens
DINOV3_PREFIX_TOKENS = 5  # CLS + 4 registers (ViT-L/16)


def condition_tokens(config: Any) -> int:
    """Condition tokens per sample as interiorfusion_structure.conditions makes them at `image_size`: DINOv3 patches
    (+ CLS and registers), the depth CNN's stride-16 grid, the chosen Mask2Former levels (1/32, 1/16, 1/8), the
    layout statements and one camera token (3,398 at the seed's 512 px)."""
    c = config.model.conditioning
    n = c.image_size // 16
    per = {
        "image": n * n + DINOV3_PREFIX_TOKENS,
        "depth": n * n,
        "semantic": sum((c.image_size // (32 // 2**level)) ** 2 for level in c.semantic_levels),
        "layout": min(LAYOUT_TOKENS, c.max_layout_tokens),
        "camera": 1,
    }
    return sum(per[m] for m in c.modalities)


def latent_grid(config: Any, phase: Any) -> int:
    n = phase.resolution if phase is not None else (
        config.training.curriculum[-1].resolution if config.training.curriculum else 1024)
    return max(n // VAE_COMPRESSION, 1)


def structure_tokens(config: Any, phase: Any, tokens: float | None = None) -> float:
    """Latent tokens per sample at the phase's resolution (`tokens`: measured, returned as is)."""
    if tokens is not None:
        return float(tokens)
    r = latent_grid(config, phase)
    return min(TOKENS_PER_R2 * r * r, float(r**3))


def block_params(width: int, mlp_hidden: int) -> int:
    """One DiT block: qkv + proj (4W²), cross q / kv / proj (4W²), MLP (2·W·hidden), biases ignored."""
    return 8 * width * width + 2 * width * mlp_hidden


def dit_forward_flops(tokens: float, width: int, depth: int, mlp_hidden: int, cond_tokens: float,
                      window_tokens: float | None = None) -> dict[str, float]:
    """Forward FLOPs per sample of one DiT, split into the linear layers and the two attentions."""
    linear = 2.0 * tokens * depth * (6 * width * width + 2 * width * mlp_hidden) + 2.0 * cond_tokens * depth * (
        2 * width * width)
    self_attention = depth * attention_flops(tokens, width, window_tokens)
    cross_attention = depth * 4.0 * tokens * cond_tokens * width
    return {"linear": linear, "self_attention": self_attention, "cross_attention": cross_attention}


def structure_flop_terms(config: Any, phase: Any, tokens: float | None = None) -> dict[str, float]:
    """Training FLOPs (forward + backward ≈ 3 × forward) per sample, by term, for both flows."""
    m = config.model
    r = latent_grid(config, phase)
    tokens = structure_tokens(config, phase, tokens)
    window = None
    if m.attention.kind == "window":
        window = mean_window_tokens(tokens, r, m.attention.window)
        if m.attention.full_every:
            # Every full_every-th block attends fully: the mean keys per query over the blocks.
            frac = 1.0 / m.attention.full_every
            window = frac * tokens + (1 - frac) * window
    cond = condition_tokens(config)
    lat = dit_forward_flops(tokens, m.width, m.depth, m.mlp_hidden, cond, window)
    o = config.occupancy
    occ_tokens = float(max(r // o.patch, 1) ** 3)
    occ = dit_forward_flops(occ_tokens, o.width, o.depth, o.mlp_hidden, cond)
    terms = {f"latent_{k}": 3.0 * v for k, v in lat.items()}
    terms |= {f"occupancy_{k}": 3.0 * v for k, v in occ.items()}
    return terms


def structure_flops(config: Any, phase: Any, tokens: float | None = None) -> float:
    return sum(structure_flop_terms(config, phase, tokens).values())


def structure_activation_bytes(config: Any, phase: Any, micro_batch: int, checkpointing: bool,
                               tokens: float | None = None) -> float:
    """Saved activations of the latent DiT in bf16: per block ~ (14·W + 2·hidden) values per token (norm and
    modulation outputs, q/k/v, attention output, MLP hidden twice); flash / fused SDPA keeps no T² matrix.
    Checkpointing keeps one W-vector per token per block and recomputes one block at a time."""
    m = config.model
    tokens = structure_tokens(config, phase, tokens)
    per_block = tokens * (14 * m.width + 2 * m.mlp_hidden) * 2
    if checkpointing or m.gradient_checkpointing:
        return micro_batch * (m.depth * tokens * m.width * 2 + per_block)
    return micro_batch * m.depth * per_block


# ------------------------------------------------------------------------------------------------ planner
# The condition tokens' width until the config names it (ConditioningConfig.width): the seed DiT's 1.34B assume it.
DEFAULT_COND_WIDTH = 1024


def condition_width(config: Any) -> int:
    return int(getattr(config.model.conditioning, "width", DEFAULT_COND_WIDTH))


class StructureNetworks(nn.Module):
    """The two flows alone, for planning where the condition encoder cannot be built (`missing` says why)."""

    def __init__(self, config: Any, missing: str):
        from interiorfusion_structure.model import DEFAULT_LATENT_CHANNELS, build_dit, build_occupancy_dit

        super().__init__()
        self.missing = missing
        cond_width = condition_width(config)
        self.latent = build_dit(config.model, DEFAULT_LATENT_CHANNELS, cond_width)
        self.occupancy = build_occupancy_dit(config.occupancy, config.model, cond_width)


def build_structure(config: Any) -> nn.Module:
    """StructureModel(config); without its condition encoder (not importable here) the two flows alone."""
    from interiorfusion_structure.model import StructureModel

    try:
        return StructureModel(config)
    except ImportError as exc:  # conditions.py (or its encoders' packages) absent: plan what can be built
        return StructureNetworks(config, f"{type(exc).__name__}: {exc}")


def _count(module: nn.Module | None) -> int | None:
    return None if module is None else sum(p.numel() for p in module.parameters())


def structure_components(model: nn.Module) -> dict[str, int | None]:
    return {"latent DiT": _count(model.latent), "occupancy DiT": _count(model.occupancy),
            "condition encoder": _count(getattr(model, "conditions", None))}


def latent_tokens_from(config: Any, uri: str) -> dict[int, float]:
    """Mean latent tokens per train sample at every resolution a VAE output holds (from its indexes alone)."""
    from interiorfusion_vae.latents import open_latents

    first = open_latents(uri, "train", require_manifest=False)
    out = {}
    for resolution in first.resolutions:
        ds = first if resolution == first.resolution else open_latents(uri, "train", resolution,
                                                                      require_manifest=False)
        counts = ds.token_counts()
        if len(counts):
            out[resolution] = float(counts.mean())
    return out


STRUCTURE_MODEL = register_model_builder(
    "dit_structure", build_structure, tokens_per_sample=structure_tokens, flops_per_sample=structure_flops,
    activation_bytes=structure_activation_bytes, flop_terms=structure_flop_terms, components=structure_components,
    tokens_from=latent_tokens_from,
    description="stage 2: latent flow DiT + coarse-occupancy DiT (+ condition encoder), attention FLOPs counted",
)


__all__ = ["STRUCTURE_MODEL", "TOKENS_PER_R2", "StructureNetworks", "block_params", "build_structure",
           "dit_forward_flops", "latent_tokens_from", "structure_activation_bytes", "structure_components",
           "structure_flop_terms", "structure_flops", "structure_tokens"]
