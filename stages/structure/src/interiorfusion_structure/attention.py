"""Packed variable-length attention, 3D rotary embeddings and voxel windows: the pieces of the DiT that see tokens.

Tokens are the sparse latent cells of several samples, concatenated ("packed"): sample b's tokens are rows
`offsets[b]:offsets[b+1]`. Attention never crosses samples and nothing is padded to the batch's longest sample.

One choice point, `varlen_attention(..., backend=)`:
- `flash`: flash-attn's `flash_attn_varlen_func` (CUDA, fp16/bf16, when the package is installed);
- `sdpa`: segments grouped by length; each group is one batched `scaled_dot_product_attention` call without a
  mask (so the fused CPU/GPU kernels run). Windows, whose lengths vary, are rounded up to a multiple of
  `PAD_MULTIPLE` inside a group and masked: padding is bounded by the window's bucket, never by the batch;
- `mask`: one SDPA call with a block-diagonal mask over all tokens (the reference; O(T²) memory);
- `auto`: `flash` where available, else `sdpa`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "sdpa", "mask")
# Distinct segment lengths beyond which `sdpa` rounds lengths up (window attention: many small windows).
EXACT_GROUPS = 8
PAD_MULTIPLE = 16


@dataclass(frozen=True)
class Segments:
    """Packed segment boundaries: segment i is rows offsets[i]:offsets[i+1] (int64, on the tokens' device)."""

    offsets: torch.Tensor  # [S + 1]

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor | list[int]) -> Segments:
        lengths = torch.as_tensor(lengths, dtype=torch.int64)
        return cls(torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]))

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def count(self) -> int:
        return len(self.offsets) - 1

    @property
    def total(self) -> int:
        return int(self.offsets[-1])

    def ids(self) -> torch.Tensor:
        """Segment index of every row [T]."""
        return torch.repeat_interleave(torch.arange(self.count, device=self.offsets.device), self.lengths)

    def to(self, device: torch.device | str) -> Segments:
        return Segments(self.offsets.to(device))


@lru_cache(maxsize=1)
def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    flash_ok = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _flash_varlen() is not None
    if backend == "auto":
        return "flash" if flash_ok else "sdpa"
    if backend == "flash" and not flash_ok:
        raise ValueError("attention backend 'flash' needs flash-attn installed, a CUDA device and fp16/bf16 inputs")
    return backend


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_segments: Segments,
                     k_segments: Segments | None = None, backend: str = "auto") -> torch.Tensor:
    """Attention of q segment i over k/v segment i only. q [Tq, H, D], k and v [Tk, H, D] → [Tq, H, D]."""
    k_segments = q_segments if k_segments is None else k_segments
    if q_segments.count != k_segments.count:
        raise ValueError(f"{q_segments.count} query segments but {k_segments.count} key segments")
    chosen = resolve_backend(backend, q)
    if chosen == "flash":
        fn = _flash_varlen()
        cu_q, cu_k = q_segments.offsets.to(torch.int32), k_segments.offsets.to(torch.int32)
        return fn(q, k, v, cu_q, cu_k, int(q_segments.lengths.max()), int(k_segments.lengths.max()))
    if chosen == "mask":
        mask = q_segments.ids()[:, None] == k_segments.ids()[None, :]
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             attn_mask=mask)
        return out.transpose(0, 1)
    return _grouped_sdpa(q, k, v, q_segments, k_segments)


def _grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qs: Segments, ks: Segments) -> torch.Tensor:
    """Segments of equal (query, key) length run as one batched SDPA call each."""
    lq, lk = qs.lengths.tolist(), ks.lengths.tolist()
    exact = len(set(zip(lq, lk, strict=True))) <= EXACT_GROUPS
    if not exact:
        lq = [_round_up(n) for n in lq]
        lk = [_round_up(n) for n in lk]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, key in enumerate(zip(lq, lk, strict=True)):
        groups.setdefault(key, []).append(i)
    if len(groups) == 1 and exact and qs.count >= 1:
        # One length for every segment (dense grids, equal windows): a plain reshape, no gather.
        (a, b), _ = next(iter(groups.items()))
        out = F.scaled_dot_product_attention(
            q.view(qs.count, a, *q.shape[1:]).transpose(1, 2), k.view(ks.count, b, *k.shape[1:]).transpose(1, 2),
            v.view(ks.count, b, *v.shape[1:]).transpose(1, 2))
        return out.transpose(1, 2).reshape_as(q)
    if exact:
        return _split_sdpa(q, k, v, lq, lk, groups)
    out = q.new_empty(q.shape)
    q_start, k_start = qs.offsets[:-1], ks.offsets[:-1]
    q_len, k_len = qs.lengths, ks.lengths
    for (a, b), members in groups.items():
        idx = torch.tensor(members, device=q.device)
        qi = q_start[idx, None] + torch.arange(a, device=q.device)  # [G, a]
        ki = k_start[idx, None] + torch.arange(b, device=q.device)
        mask = None
        if not exact:
            q_valid = torch.arange(a, device=q.device) < q_len[idx, None]
            k_valid = torch.arange(b, device=q.device) < k_len[idx, None]
            qi, ki = torch.where(q_valid, qi, 0), torch.where(k_valid, ki, 0)
            mask = k_valid[:, None, None, :]  # [G, 1, 1, b]
        res = F.scaled_dot_product_attention(q[qi].transpose(1, 2), k[ki].transpose(1, 2), v[ki].transpose(1, 2),
                                             attn_mask=mask).transpose(1, 2)  # [G, a, H, D]
        if exact:
            out[qi.reshape(-1)] = res.reshape(-1, *q.shape[1:])
        else:
            keep = q_valid.reshape(-1)
            out[qi.reshape(-1)[keep]] = res.reshape(-1, *q.shape[1:])[keep]
    return out


def _split_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lq: list[int], lk: list[int],
                groups: dict[tuple[int, int], list[int]]) -> torch.Tensor:
    """Exact lengths: segments as views (split), stacked per group, outputs concatenated in segment order. Unlike
    index gathers and scatters, the backward of split / stack / cat is one copy, with no zero-filled buffers."""
    qs, ks, vs = q.split(lq), k.split(lk), v.split(lk)
    pieces: list[torch.Tensor | None] = [None] * len(lq)
    for members in groups.values():
        res = F.scaled_dot_product_attention(_stack(qs, members).transpose(1, 2), _stack(ks, members).transpose(1, 2),
                                             _stack(vs, members).transpose(1, 2)).transpose(1, 2)  # [G, a, H, D]
        for i, r in zip(members, res.unbind(0), strict=True):
            pieces[i] = r
    return torch.cat(pieces)


def _stack(parts: tuple[torch.Tensor, ...], members: list[int]) -> torch.Tensor:
    if len(members) == 1:
        return parts[members[0]].unsqueeze(0)  # a view: no copy
    return torch.stack([parts[i] for i in members])


def _round_up(n: int) -> int:
    return max(PAD_MULTIPLE, -(-n // PAD_MULTIPLE) * PAD_MULTIPLE)


# ------------------------------------------------------------------------------------------------ rotary
class Rope3D(torch.nn.Module):
    """Rotary embeddings from a token's (x, y, z) grid coordinates: the head's channel pairs are split over the
    three axes (as evenly as the pair count allows), each axis rotating its pairs by coordinate × frequency.
    q·k then depends on coordinate differences only, so a scene shifted in the grid attends the same way."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head width, got {head_dim}")
        pairs = head_dim // 2
        per_axis = [pairs // 3 + (1 if a < pairs % 3 else 0) for a in range(3)]
        freqs = [theta ** (-torch.arange(n, dtype=torch.float64) / max(n, 1)) for n in per_axis]
        self.register_buffer("freqs", torch.cat(freqs).float(), persistent=False)
        self.register_buffer("axis", torch.cat([torch.full((n,), a) for a, n in enumerate(per_axis)]),
                             persistent=False)

    def forward(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """coords [T, 3] → (cos, sin) [T, head_dim / 2], float32 (angles of large coordinates need its bits)."""
        angles = coords.float()[:, self.axis] * self.freqs
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x [T, H, D] by the token's angles, in float32: pair (a, b) as a + ib
    times cos + i·sin, one complex multiply (a split into halves and a stack would cost several passes and
    copies, forward and backward)."""
    x2 = x.float().unflatten(-1, (-1, 2))
    if x2.stride(-1) != 1 or x2.storage_offset() % 2 or any(st % 2 for st in x2.stride()[:-1]):
        x2 = x2.contiguous()  # view_as_complex needs (re, im) adjacent
    rot = torch.view_as_complex(x2) * torch.complex(cos, sin)[:, None, :]
    return torch.view_as_real(rot).flatten(-2).to(x.dtype)


# ------------------------------------------------------------------------------------------------ windows
@dataclass(frozen=True)
class WindowPartition:
    """Tokens regrouped so each (sample, window) is contiguous: `order` permutes packed rows into window order,
    `inverse` puts them back, `segments` are the windows."""

    order: torch.Tensor
    inverse: torch.Tensor
    segments: Segments


def window_partition(coords: torch.Tensor, window: int, shift: int = 0) -> WindowPartition:
    """Group packed tokens (coords [T, 4] = sample, x, y, z) into cubic windows of `window` cells, the grid shifted
    by `shift` cells (Swin's shifted windows: alternate blocks shift by window / 2 so information crosses window
    borders). A window larger than twice the grid holds every token of a sample: full attention."""
    c = coords.long()
    cell = torch.div(c[:, 1:] + shift, window, rounding_mode="floor")
    cell = cell - cell.min(0).values
    dims = cell.max(0).values + 1
    key = ((c[:, 0] * dims[0] + cell[:, 0]) * dims[1] + cell[:, 1]) * dims[2] + cell[:, 2]
    order = torch.argsort(key, stable=True)
    _, counts = torch.unique_consecutive(key[order], return_counts=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return WindowPartition(order, inverse, Segments.from_lengths(counts.to(coords.device)))


def attention_flops(tokens: float, width: int, window_tokens: float | None = None) -> float:
    """Forward FLOPs of softmax(QKᵀ)V for one sample of `tokens` tokens (2 matmuls of 2·T·T'·width each), with T'
    = min(T, window_tokens) keys per query when windowed."""
    keys = tokens if window_tokens is None else min(tokens, window_tokens)
    return 4.0 * tokens * keys * width


def mean_window_tokens(tokens: float, grid: int, window: int) -> float:
    """Expected tokens per occupied window when `tokens` surface cells spread over a grid³ (an estimate): a surface
    fills a window of w³ cells as it fills the grid, by area (∝ w²), bounded by the window's volume."""
    if window >= grid:
        return tokens
    return min(float(window**3), tokens * (window / grid) ** 2)
