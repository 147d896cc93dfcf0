"""Functional sparse ops that are the same for every backend: space<->channel, pruning, batch-aware norms."""

from __future__ import annotations

import torch

from .maps import kernel_offsets, strided_map, transposed_map
from .tensor import CoordinateCache, SparseTensor

_TWO = (2, 2, 2)
_ZERO = (0, 0, 0)


def space_to_channel(x: SparseTensor) -> tuple[SparseTensor, torch.Tensor]:
    """2x per axis space-to-channel: each parent cell gets its 8 children's features side by side.

    Returns the parent-level tensor with ``8 * C`` channels, channel ``j * C + c`` holding child ``j``'s
    channel ``c`` (child ``j = (dx * 2 + dy) * 2 + dz`` at ``2 * parent + (dx, dy, dz)``, zeros if absent),
    and the [M, 8] boolean child mask (which children exist: the subdivision an early-pruning head learns).
    """
    if any(s % 2 for s in x.spatial_shape):
        raise ValueError(f"space_to_channel needs an even grid, got {x.spatial_shape}")
    level, kmap = strided_map(x, _TWO, _TWO, _ZERO)
    m, c = kmap.n_out, x.num_channels
    # Each child has exactly one (parent, slot): destination row parent * 8 + slot is unique.
    slots = torch.repeat_interleave(
        torch.arange(8, device=x.device), torch.tensor(kmap.counts(), device=x.device)
    )
    dest = kmap.out_idx * 8 + slots
    feats = x.feats.new_zeros(m * 8, c).index_copy(0, dest, x.feats.index_select(0, kmap.in_idx))
    mask = torch.zeros(m * 8, dtype=torch.bool, device=x.device)
    mask[dest] = True
    out = SparseTensor(
        level.coords, feats.view(m, 8 * c), level.spatial_shape, level.stride, x.batch_size, cache=level.cache
    )
    return out, mask.view(m, 8)


def channel_to_space(
    x: SparseTensor, child_mask: torch.Tensor | None = None, target: SparseTensor | None = None
) -> SparseTensor:
    """Inverse of `space_to_channel`: ``8 * C`` channels per parent -> C channels on its children.

    With ``target``, the output lives exactly on the target's coordinates (e.g. the encoder's level; a target
    voxel whose parent is absent gets zeros). Otherwise the output is the children kept by ``child_mask``
    ([M, 8] bool; all 8 if None), in parent-major, child-minor order (not lexicographic; see `.sorted()`).
    """
    if x.num_channels % 8:
        raise ValueError(f"channel_to_space needs channels divisible by 8, got {x.num_channels}")
    c = x.num_channels // 8
    flat = x.feats.reshape(x.num_voxels * 8, c)
    if target is not None:
        if child_mask is not None:
            raise ValueError("channel_to_space: pass either child_mask or target, not both")
        _, kmap = transposed_map(x, _TWO, _TWO, _ZERO, target)
        slots = torch.repeat_interleave(
            torch.arange(8, device=x.device), torch.tensor(kmap.counts(), device=x.device)
        )
        src = kmap.in_idx * 8 + slots
        feats = flat.new_zeros(target.num_voxels, c).index_copy(0, kmap.out_idx, flat.index_select(0, src))
        return target.replace(feats)
    if child_mask is None:
        child_mask = torch.ones(x.num_voxels, 8, dtype=torch.bool, device=x.device)
    if child_mask.shape != (x.num_voxels, 8):
        raise ValueError(f"child_mask must be [{x.num_voxels}, 8], got {tuple(child_mask.shape)}")
    parent, slot = child_mask.nonzero(as_tuple=True)
    offsets = kernel_offsets(_TWO, centered=False, device=x.device)
    coords = x.coords.index_select(0, parent)
    coords = torch.cat([coords[:, :1], coords[:, 1:] * 2 + offsets.index_select(0, slot)], 1)
    feats = flat.index_select(0, parent * 8 + slot)
    shape = tuple(s * 2 for s in x.spatial_shape)
    stride = tuple(max(s // 2, 1) for s in x.stride)
    return SparseTensor(coords, feats, shape, stride, x.batch_size)


def prune(x: SparseTensor, keep: torch.Tensor) -> SparseTensor:
    """Keep the voxels where ``keep`` ([N] bool) is True, in order. Keeping all reuses the map cache."""
    if keep.shape != (x.num_voxels,) or keep.dtype != torch.bool:
        raise ValueError(f"prune mask must be bool [{x.num_voxels}], got {keep.dtype} {tuple(keep.shape)}")
    if bool(keep.all()):
        return x
    rows = keep.nonzero().squeeze(1)
    return SparseTensor(
        x.coords.index_select(0, rows),
        x.feats.index_select(0, rows),
        x.spatial_shape,
        x.stride,
        x.batch_size,
        cache=CoordinateCache(),
    )


def group_norm(
    x: SparseTensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """GroupNorm over each sample's voxels separately (batch-aware): statistics per (sample, group) over
    that sample's active voxels and the group's channels, like ``F.group_norm`` on one dense sample whose
    spatial extent is its active voxels. Returns the normalised features."""
    n, c = x.feats.shape
    if c % num_groups:
        raise ValueError(f"{c} channels do not split into {num_groups} groups")
    f = x.feats
    if f.dtype in (torch.float16, torch.bfloat16):
        f = f.float()  # statistics in fp32 for half-precision features
    f = f.view(n, num_groups, c // num_groups)
    b = x.batch_index
    count = torch.bincount(b, minlength=x.batch_size).clamp_(min=1).to(f.dtype) * (c // num_groups)
    total = f.new_zeros(x.batch_size, num_groups).index_add_(0, b, f.sum(-1))
    mean = (total / count[:, None]).index_select(0, b)
    centred = f - mean[:, :, None]
    sq = f.new_zeros(x.batch_size, num_groups).index_add_(0, b, centred.square().sum(-1))
    inv_std = torch.rsqrt(sq / count[:, None] + eps).index_select(0, b)
    y = (centred * inv_std[:, :, None]).view(n, c)
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.feats.dtype)
