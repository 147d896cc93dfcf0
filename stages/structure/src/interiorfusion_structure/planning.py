"""What the planner needs to know about stage 2: tokens, FLOPs (attention counted) and activations per sample.

An interior is not an object: at 1024³ a room has ~6 M surface voxels, so its 64³ latent grid has ~24–40k
occupied cells (an object in TRELLIS.2 has ~4k). Tokens grow with the surface, ∝ R² for a latent grid R³;
`TOKENS_PER_R2` is fitted to that range (7 · 64² = 28.7k). With full attention the T² term dominates the step
at that size; windowed attention replaces T keys per query by the tokens of one window.
"""

from __future__ import annotations

from typing import Any

from interiorfusion_structure.attention import attention_flops, mean_window_tokens

TOKENS_PER_R2 = 7.0
VAE_COMPRESSION = 16  # the seed VAE's 4 downsamplings (stages/vae); latent grid R = N / 16
CONDITION_TOKENS = 1024 + 1024 + 64 + 1  # DINOv3 (32² patches at 512²) + semantic pyramid + layout + camera


def latent_grid(config: Any, phase: Any) -> int:
    n = phase.resolution if phase is not None else (
        config.training.curriculum[-1].resolution if config.training.curriculum else 1024)
    return max(n // VAE_COMPRESSION, 1)


def structure_tokens(config: Any, phase: Any) -> float:
    """Latent tokens per sample at the phase's resolution."""
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


def structure_flop_terms(config: Any, phase: Any) -> dict[str, float]:
    """Training FLOPs (forward + backward ≈ 3 × forward) per sample, by term, for both flows."""
    m = config.model
    r = latent_grid(config, phase)
    tokens = structure_tokens(config, phase)
    window = None
    if m.attention.kind == "window":
        window = mean_window_tokens(tokens, r, m.attention.window)
        if m.attention.full_every:
            # Every full_every-th block attends fully: the mean keys per query over the blocks.
            frac = 1.0 / m.attention.full_every
            window = frac * tokens + (1 - frac) * window
    lat = dit_forward_flops(tokens, m.width, m.depth, m.mlp_hidden, CONDITION_TOKENS, window)
    o = config.occupancy
    occ_tokens = float(max(r // o.patch, 1) ** 3)
    occ = dit_forward_flops(occ_tokens, o.width, o.depth, o.mlp_hidden, CONDITION_TOKENS)
    terms = {f"latent_{k}": 3.0 * v for k, v in lat.items()}
    terms |= {f"occupancy_{k}": 3.0 * v for k, v in occ.items()}
    return terms


def structure_flops(config: Any, phase: Any) -> float:
    return sum(structure_flop_terms(config, phase).values())


def structure_activation_bytes(config: Any, phase: Any, micro_batch: int, checkpointing: bool) -> float:
    """Saved activations of the latent DiT in bf16: per block ~ (14·W + 2·hidden) values per token (norm and
    modulation outputs, q/k/v, attention output, MLP hidden twice); flash / fused SDPA keeps no T² matrix.
    Checkpointing keeps one W-vector per token per block and recomputes one block at a time."""
    m = config.model
    tokens = structure_tokens(config, phase)
    per_block = tokens * (14 * m.width + 2 * m.mlp_hidden) * 2
    if checkpointing or m.gradient_checkpointing:
        return micro_batch * (m.depth * tokens * m.width * 2 + per_block)
    return micro_batch * m.depth * per_block


__all__ = ["TOKENS_PER_R2", "block_params", "dit_forward_flops", "structure_activation_bytes", "structure_flop_terms",
           "structure_flops", "structure_tokens"]
