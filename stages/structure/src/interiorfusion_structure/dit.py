"""The DiT backbone both flows of stage 2 (and stages 3 and 4) use: packed sparse tokens, AdaLN-single, 3D RoPE.

Per block (PixArt-α's layout, TRELLIS.2's `share_mod`):

    x += gate_msa · attention(modulate(norm1(x), shift_msa, scale_msa))      self-attention, QK RMSNorm, 3D RoPE
    x += cross_attention(norm2(x), condition tokens)                          per sample, packed
    x += gate_mlp · mlp(modulate(norm3(x), shift_mlp, scale_mlp))

AdaLN-single: one MLP maps the timestep embedding plus the pooled condition to the six modulation vectors, shared
by every block; each block adds its own learned `scale_shift_table` (6 × width). That is ~30× fewer modulation
parameters than DiT's per-block adaLN MLPs (on the seed model 14M instead of 425M).

Module names follow the seed's LoRA targets: `attention.qkv`, `attention.proj`, `mlp.fc1`, `mlp.fc2` (peft
matches them as name suffixes; the cross-attention's `cross_attention.q|kv|proj` do not match them).

Self-attention is full per sample, or windowed over the voxel grid (`attention: window`, Swin-style shifted windows
on odd blocks, optionally a full-attention block every `full_every` blocks): its cost grows with tokens × window
instead of tokens².
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from interiorfusion_structure.attention import (
    Rope3D,
    Segments,
    WindowPartition,
    apply_rope,
    varlen_attention,
    window_partition,
)

TIME_SCALE = 1000.0  # t ∈ [0, 1] is embedded as t · 1000, the range sinusoidal embeddings are tuned for
FREQ_DIM = 256


@dataclass
class Context:
    """What the DiT is conditioned on, already at the DiT's width: packed condition tokens and the pooled vector
    added to the timestep embedding."""

    tokens: torch.Tensor  # [ΣK, width]
    segments: Segments  # one segment per sample
    pooled: torch.Tensor  # [B, width]


class Linear(nn.Linear):
    """nn.Linear initialised in its own constructor: under DeepSpeed's zero.Init a module's parameters are
    partitioned as soon as its __init__ returns, so an init pass over the finished model would see empty shards.
    `init`: xavier (DiT's default), zeros (layers that must start at 0) or normal (std 0.02, the timestep MLP)."""

    def __init__(self, in_features: int, out_features: int, init: str = "xavier"):
        super().__init__(in_features, out_features)
        if init == "xavier":
            nn.init.xavier_uniform_(self.weight)
        elif init == "zeros":
            nn.init.zeros_(self.weight)
        elif init == "normal":
            nn.init.normal_(self.weight, std=0.02)
        else:
            raise ValueError(f"unknown init {init!r}")
        nn.init.zeros_(self.bias)


def timestep_embedding(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * TIME_SCALE)[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


# Up to this many samples a packed batch's per-token rows are a concatenation of broadcasts, beyond it a gather.
EXPAND_SEGMENTS = 64


def per_token(rows: torch.Tensor, segments: Segments, token_sample: torch.Tensor) -> torch.Tensor:
    """rows [B, ...] → [T, ...]: sample b's row for each of its tokens. For a few samples, cat of expanded views:
    its backward is a sum per segment, where a gather's is a zero-filled scatter-add (several times slower)."""
    if segments.count > EXPAND_SEGMENTS:
        return rows[token_sample]
    lengths = segments.lengths.tolist()
    return torch.cat([r.expand(n, *r.shape) for r, n in zip(rows.unbind(0), lengths, strict=True)])


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, qk_norm: bool, backend: str):
        super().__init__()
        self.heads, self.head_dim, self.backend = heads, width // heads, backend
        self.qkv = Linear(width, 3 * width)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = Linear(width, width)

    def forward(self, x: torch.Tensor, segments: Segments, rope: tuple[torch.Tensor, torch.Tensor] | None,
                partition: WindowPartition | None) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv(x).view(T, 3, self.heads, self.head_dim).unbind(1)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if partition is not None:
            q, k, v = q[partition.order], k[partition.order], v[partition.order]
            out = varlen_attention(q, k, v, partition.segments, backend=self.backend)[partition.inverse]
        else:
            out = varlen_attention(q, k, v, segments, backend=self.backend)
        return self.proj(out.reshape(T, -1))


class CrossAttention(nn.Module):
    def __init__(self, width: int, heads: int, qk_norm: bool, backend: str):
        super().__init__()
        self.heads, self.head_dim, self.backend = heads, width // heads, backend
        self.q = Linear(width, width)
        self.kv = Linear(width, 2 * width)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        # Zero: the untrained network ignores its conditions (PixArt-α's cross-attention init).
        self.proj = Linear(width, width, init="zeros")

    def forward(self, x: torch.Tensor, segments: Segments, context: Context) -> torch.Tensor:
        T, K = x.shape[0], context.tokens.shape[0]
        q = self.q_norm(self.q(x).view(T, self.heads, self.head_dim))
        k, v = self.kv(context.tokens).view(K, 2, self.heads, self.head_dim).unbind(1)
        out = varlen_attention(q, self.k_norm(k), v, segments, context.segments, backend=self.backend)
        return self.proj(out.reshape(T, -1))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_hidden: int, qk_norm: bool, backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attention = SelfAttention(width, heads, qk_norm, backend)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=True, eps=1e-6)
        self.cross_attention = CrossAttention(width, heads, qk_norm, backend)
        self.norm3 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(width, mlp_hidden)
        # AdaLN-single: this block's learned offsets on the shared modulation (PixArt-α's scale_shift_table).
        self.scale_shift_table = nn.Parameter(torch.randn(6, width) / width**0.5)

    def forward(self, x: torch.Tensor, token_sample: torch.Tensor | None, modulation: torch.Tensor,
                segments: Segments, rope: tuple[torch.Tensor, torch.Tensor] | None,
                partition: WindowPartition | None, context: Context) -> torch.Tensor:
        mod = self.scale_shift_table[None] + modulation  # [B, 6, W]
        # Per-token modulation: one sample broadcasts; a packed batch repeats its sample's row per token.
        mod = mod if token_sample is None else per_token(mod, segments, token_sample)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(1)
        x = x + gate_msa * self.attention(modulate(self.norm1(x), shift_msa, scale_msa), segments, rope, partition)
        x = x + self.cross_attention(self.norm2(x), segments, context)
        return x + gate_mlp * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))


class DiT(nn.Module):
    """A flow transformer over packed sparse tokens.

    forward(x [T, in], coords [T, 4] (sample, x, y, z grid cells), segments (one per sample, in sample order),
            t [B] in [0, 1], condition tokens [ΣK, cond_width] with their segments, pooled [B, cond_width])
        → velocity [T, out]
    """

    def __init__(self, in_channels: int, out_channels: int, *, width: int, depth: int, heads: int, mlp_hidden: int,
                 cond_width: int, qk_norm: bool = True, rope: bool = True, rope_theta: float = 10000.0,
                 attention: str = "full", window: int = 8, full_every: int = 0, backend: str = "auto",
                 gradient_checkpointing: bool = False, token_cond_channels: int = 0):
        super().__init__()
        if attention not in ("full", "window"):
            raise ValueError(f"attention must be 'full' or 'window', got {attention!r}")
        self.width, self.attention_kind, self.window, self.full_every = width, attention, window, full_every
        self.gradient_checkpointing = gradient_checkpointing
        self.x_embed = Linear(in_channels, width)
        # Per-token conditions beside the noised input (the lifted condition depth), zero at first.
        self.token_cond = Linear(token_cond_channels, width, "zeros") if token_cond_channels else None
        self.t_embed = nn.Sequential(Linear(FREQ_DIM, width, "normal"), nn.SiLU(), Linear(width, width, "normal"))
        self.cond_proj = Linear(cond_width, width)
        self.pool_proj = Linear(cond_width, width)
        # The one shared modulation MLP, zero at first: every block starts as its scale_shift_table says.
        self.adaln = nn.Sequential(nn.SiLU(), Linear(width, 6 * width, "zeros"))
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_hidden, qk_norm, backend) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_table = nn.Parameter(torch.randn(2, width) / width**0.5)
        # Zero output layer: the untrained network predicts velocity 0 (DiT / PixArt-α initialisation).
        self.out = Linear(width, out_channels, init="zeros")
        self.rope = Rope3D(width // heads, rope_theta) if rope else None

    def block_uses_window(self, i: int) -> bool:
        if self.attention_kind != "window":
            return False
        return not (self.full_every and (i + 1) % self.full_every == 0)

    def forward(self, x: torch.Tensor, coords: torch.Tensor, segments: Segments, t: torch.Tensor,
                cond_tokens: torch.Tensor, cond_segments: Segments, pooled: torch.Tensor,
                token_cond: torch.Tensor | None = None) -> torch.Tensor:
        if segments.count != len(t) or cond_segments.count != len(t) or len(pooled) != len(t):
            raise ValueError(f"{segments.count} token segments, {cond_segments.count} condition segments, "
                             f"{len(pooled)} pooled conditions and {len(t)} timesteps: one of each per sample")
        h = self.x_embed(x)
        if self.token_cond is not None:
            if token_cond is None:
                raise ValueError("this DiT was built with per-token conditions; pass token_cond [T, C]")
            h = h + self.token_cond(token_cond.to(h.dtype))
        c = self.t_embed(timestep_embedding(t).to(h.dtype)) + self.pool_proj(pooled)
        modulation = self.adaln(c).view(len(t), 6, self.width)
        context = Context(self.cond_proj(cond_tokens), cond_segments, pooled)
        token_sample = None if len(t) == 1 else segments.ids()
        rope = self.rope(coords[:, 1:]) if self.rope is not None else None
        partitions: dict[int, WindowPartition] = {}
        if self.attention_kind == "window":
            for shift in (0, self.window // 2):
                partitions[shift] = window_partition(coords, self.window, shift)
        for i, block in enumerate(self.blocks):
            partition = partitions[(self.window // 2) * (i % 2)] if self.block_uses_window(i) else None
            args = (h, token_sample, modulation, segments, rope, partition, context)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, *args, use_reentrant=False)
            else:
                h = block(*args)
        shift, scale = (self.final_table[None] + c[:, None]).unbind(1)
        if token_sample is not None:
            shift, scale = per_token(shift, segments, token_sample), per_token(scale, segments, token_sample)
        return self.out(modulate(self.final_norm(h), shift, scale))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["Context", "DiT", "count_parameters", "timestep_embedding"]
