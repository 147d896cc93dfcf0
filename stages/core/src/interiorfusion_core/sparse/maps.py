"""Neighbour (kernel) maps: for every kernel offset, the compact pair list (in_idx, out_idx).

Offset order is the canonical one of this package (see `layout.py`): kernel index ``(ix, iy, iz)`` in C order,
``k = (ix * ky + iy) * kz + iz`` (x slowest, z fastest).

- submanifold conv (odd k): output sites = input sites; offset k reads the input at ``out + (i - (k-1)//2)``.
- strided conv (kernel k, stride s, padding p): ``out[o] += in[o*s - p + i] @ W[k]`` like ``F.conv3d``;
  output sites are every ``o`` some input reaches.
- transposed conv: the same relation read backwards, ``out[o*s - p + i] += in[o] @ W[k]`` like
  ``F.conv_transpose3d``; output sites are either given (a target coordinate set, e.g. the encoder's) or all
  sites any input reaches (for k = s = 2: the 8 children).

For a fixed offset every relation above is one-to-one, so each offset's in_idx and out_idx are both free of
repeats: scatter-adds per offset never collide (deterministic without atomics, on CPU and GPU).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .tensor import CoordinateCache, SparseTensor, _triple, linear_keys

# Dense lookup tables up to this many cells (int32: 1 GiB, one 512³ grid with its border); beyond it, sorted keys +
# searchsorted. The binary searches are what made a 512³ VAE step cost more per voxel than a 256³ one (the limit was
# 128 MiB, so 256³ was dense and 512³ searched): 7.4 s against 8.3 s per step, exponent vs voxels 1.04 against 1.08.
# On CPU the table is one reused scratch buffer; on a GPU a transient allocation.
DENSE_TABLE_MAX_CELLS = 1 << 28


def kernel_offsets(
    kernel_size: Sequence[int], centered: bool, device: torch.device | None = None
) -> torch.Tensor:
    """[K, 3] int64 kernel indices in canonical order; ``centered`` subtracts (k-1)//2 (odd kernels)."""
    kx, ky, kz = kernel_size
    ix, iy, iz = torch.meshgrid(torch.arange(kx), torch.arange(ky), torch.arange(kz), indexing="ij")
    off = torch.stack([ix.reshape(-1), iy.reshape(-1), iz.reshape(-1)], 1)
    if centered:
        off = off - torch.tensor([(kx - 1) // 2, (ky - 1) // 2, (kz - 1) // 2])
    return off.to(device) if device is not None else off


def decode_keys(keys: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Inverse of `linear_keys` with no padding: int64 keys -> [N, 4] coordinates."""
    sx, sy, sz = spatial_shape
    z = keys % sz
    r = keys // sz
    y = r % sy
    r = r // sy
    x = r % sx
    b = r // sx
    return torch.stack([b, x, y, z], 1)


class _ScratchTable:
    """A reusable CPU lookup table, kept at -1 between uses.

    Allocating and filling a fresh 64 MiB table costs ~40 ms of page faults on every map build; reusing one
    and resetting only the touched cells costs O(N). GPUs allocate through the caching allocator: no reuse.
    """

    def __init__(self) -> None:
        self.table = torch.empty(0, dtype=torch.int32)
        self.lock = threading.Lock()

    def acquire(self, cells: int) -> torch.Tensor | None:
        """The scratch table (caller must `release`), or None if another user holds it."""
        if not self.lock.acquire(blocking=False):
            return None
        if self.table.numel() < cells:
            self.table = torch.empty(0, dtype=torch.int32)  # free the old one before allocating
            self.table = torch.full((cells,), -1, dtype=torch.int32)
        return self.table[:cells]

    def release(self, touched: torch.Tensor) -> None:
        self.table.index_fill_(0, touched, -1)
        self.lock.release()


_CPU_SCRATCH = _ScratchTable()


class CoordIndex:
    """Exact coordinate -> row lookup: a dense int32 table when the (padded) grid is small enough,
    else sorted keys + `torch.searchsorted`. Both are plain torch ops (any device, any thread count).
    Use as a context manager: on CPU the dense table is a shared scratch buffer returned on exit."""

    def __init__(self, coords: torch.Tensor, spatial_shape: Sequence[int], batch_size: int, pad: int = 0):
        self.spatial_shape = tuple(int(s) for s in spatial_shape)
        self.pad = pad
        self.dims = tuple(s + 2 * pad for s in self.spatial_shape)
        self.keys = linear_keys(coords, self.spatial_shape, batch_size, pad)
        self.cells = batch_size * self.dims[0] * self.dims[1] * self.dims[2]
        self.device = coords.device
        self.table: torch.Tensor | None = None
        self._scratch = False
        if self.cells > DENSE_TABLE_MAX_CELLS:
            self.sorted_keys, self.perm = torch.sort(self.keys)

    def __enter__(self) -> CoordIndex:
        if self.cells <= DENSE_TABLE_MAX_CELLS:
            n = self.keys.numel()
            if self.device.type == "cpu":
                self.table = _CPU_SCRATCH.acquire(self.cells)
                self._scratch = self.table is not None
            if self.table is None:
                self.table = torch.full((self.cells,), -1, dtype=torch.int32, device=self.device)
            self.table.index_put_((self.keys,), torch.arange(n, dtype=torch.int32, device=self.device))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._scratch:
            _CPU_SCRATCH.release(self.keys)
            self._scratch = False
        self.table = None

    def key_strides(self) -> tuple[int, int, int]:
        _, dy, dz = self.dims
        return (dy * dz, dz, 1)

    def lookup_keys(self, q: torch.Tensor) -> torch.Tensor:
        """Rows for keys ``q`` that lie on the padded grid (no bounds check); -1 where absent."""
        if self.cells <= DENSE_TABLE_MAX_CELLS:
            if self.table is None:
                raise RuntimeError("CoordIndex with a dense table must be used inside `with`")
            return self.table.index_select(0, q).long()
        if self.sorted_keys.numel() == 0:
            return torch.full_like(q, -1)
        pos = torch.searchsorted(self.sorted_keys, q).clamp_(max=self.sorted_keys.numel() - 1)
        found = self.sorted_keys.index_select(0, pos) == q
        return torch.where(found, self.perm.index_select(0, pos), torch.full_like(q, -1))

    def lookup_coords(self, coords: torch.Tensor) -> torch.Tensor:
        """Rows for arbitrary [M, 4] coordinates (out-of-grid ones allowed); -1 where absent."""
        sp = coords[:, 1:]
        lo, hi = -self.pad, torch.tensor(self.spatial_shape, device=coords.device) + self.pad
        inside = ((sp >= lo) & (sp < hi)).all(1)
        safe = torch.where(inside[:, None], coords, torch.zeros_like(coords))
        rows = self.lookup_keys(linear_keys(safe, self.spatial_shape, 0, self.pad))
        return torch.where(inside, rows, torch.full_like(rows, -1))


@dataclass(eq=False)
class KernelMap:
    """Per-offset compact pair lists, concatenated: offset k owns rows ``bounds[k]:bounds[k+1]``.

    ``identity`` is the offset whose pairs are the identity over all rows (submanifold centre); its list is
    left empty and backends use a plain matmul for it.
    """

    kernel_size: tuple[int, int, int]
    in_idx: torch.Tensor
    out_idx: torch.Tensor
    bounds: list[int]
    n_in: int
    n_out: int
    identity: int = -1
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific derived forms (spconv pairs ...)

    @property
    def volume(self) -> int:
        return len(self.bounds) - 1

    def pairs(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, e = self.bounds[k], self.bounds[k + 1]
        return self.in_idx[s:e], self.out_idx[s:e]

    def counts(self) -> list[int]:
        c = [self.bounds[k + 1] - self.bounds[k] for k in range(self.volume)]
        if self.identity >= 0:
            c[self.identity] = self.n_in
        return c

    def num_pairs(self) -> int:
        return sum(self.counts())

    def transpose(self) -> KernelMap:
        """Same pairs with input and output swapped (the map of the transposed/inverse conv)."""
        t = self.extra.get("transpose")
        if t is None:
            t = KernelMap(
                self.kernel_size, self.out_idx, self.in_idx, self.bounds, self.n_out, self.n_in, self.identity
            )
            t.extra["transpose"] = self
            self.extra["transpose"] = t
        return t


def _concat(pairs: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> tuple:
    bounds = [0]
    for i, _ in pairs:
        bounds.append(bounds[-1] + i.numel())
    empty = torch.empty(0, dtype=torch.long, device=device)
    in_idx = torch.cat([p[0] for p in pairs]) if pairs else empty
    out_idx = torch.cat([p[1] for p in pairs]) if pairs else empty
    return in_idx, out_idx, bounds


# ---- builders (uncached) ---------------------------------------------------------------------------------
def build_submanifold_map(
    coords: torch.Tensor, spatial_shape: Sequence[int], batch_size: int, kernel_size: Sequence[int]
) -> KernelMap:
    ks = _triple(tuple(kernel_size), "kernel_size")
    if any(k % 2 == 0 for k in ks):
        raise ValueError(f"submanifold conv needs odd kernel sizes, got {ks}")
    n = coords.shape[0]
    pad = max(ks) // 2
    offsets = kernel_offsets(ks, centered=True)
    vol = offsets.shape[0]
    centre = vol // 2
    pairs: list[Any] = [None] * vol
    empty = torch.empty(0, dtype=torch.long, device=coords.device)
    pairs[centre] = (empty, empty)
    with CoordIndex(coords, spatial_shape, batch_size, pad) as index:
        shifts = (offsets * torch.tensor(index.key_strides())).sum(1).tolist()
        # Offsets d and -d are mirror images: look up one half, swap (in, out) for the other half.
        for k in range(centre):
            nb = index.lookup_keys(index.keys + shifts[k])
            out_rows = (nb >= 0).nonzero().squeeze(1)
            in_rows = nb.index_select(0, out_rows)
            pairs[k] = (in_rows, out_rows)
            pairs[vol - 1 - k] = (out_rows, in_rows)
    in_idx, out_idx, bounds = _concat(pairs, coords.device)
    return KernelMap(ks, in_idx, out_idx, bounds, n, n, identity=centre)


def conv_output_shape(shape: Sequence[int], k: Sequence[int], s: Sequence[int], p: Sequence[int]) -> tuple:
    out = tuple((a + 2 * pp - kk) // ss + 1 for a, kk, ss, pp in zip(shape, k, s, p, strict=True))
    if any(o <= 0 for o in out):
        raise ValueError(f"strided conv on grid {tuple(shape)} with k={k}, s={s}, p={p} leaves no cells")
    return out


def transposed_output_shape(
    shape: Sequence[int], k: Sequence[int], s: Sequence[int], p: Sequence[int]
) -> tuple:
    return tuple((a - 1) * ss - 2 * pp + kk for a, kk, ss, pp in zip(shape, k, s, p, strict=True))


def _coarse_of(
    fine: torch.Tensor, kappa: torch.Tensor, s: torch.Tensor, p: torch.Tensor, coarse_shape: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For fine coords f and one kernel index kappa: coarse o with ``o*s - p + kappa == f``; (o, valid)."""
    num = fine[:, 1:] + p - kappa
    o = torch.div(num, s, rounding_mode="floor")
    valid = ((o * s == num) & (o >= 0) & (o < coarse_shape)).all(1)
    return torch.cat([fine[:, :1], o], 1), valid


def build_strided_map(
    coords: torch.Tensor,
    spatial_shape: Sequence[int],
    batch_size: int,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
) -> tuple[torch.Tensor, tuple[int, int, int], KernelMap]:
    """Strided conv: output coordinates (sorted) + map from ``coords`` to them."""
    dev = coords.device
    out_shape = conv_output_shape(spatial_shape, kernel_size, stride, padding)
    s, p = torch.tensor(stride, device=dev), torch.tensor(padding, device=dev)
    osh = torch.tensor(out_shape, device=dev)
    cand_rows, cand_keys = [], []
    for kappa in kernel_offsets(kernel_size, centered=False, device=dev):
        o, valid = _coarse_of(coords, kappa, s, p, osh)
        rows = valid.nonzero().squeeze(1)
        cand_rows.append(rows)
        cand_keys.append(linear_keys(o.index_select(0, rows), out_shape, batch_size))
    keys = torch.cat(cand_keys)
    uniq, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    out_coords = decode_keys(uniq, out_shape)
    pairs = list(zip(cand_rows, inverse.split([r.numel() for r in cand_rows]), strict=True))
    in_idx, out_idx, bounds = _concat(pairs, dev)
    kmap = KernelMap(tuple(kernel_size), in_idx, out_idx, bounds, coords.shape[0], out_coords.shape[0])
    return out_coords, out_shape, kmap


def build_transposed_map(
    coords: torch.Tensor,
    spatial_shape: Sequence[int],
    batch_size: int,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    target: torch.Tensor | None = None,
    target_shape: Sequence[int] | None = None,
) -> tuple[torch.Tensor, tuple[int, int, int], KernelMap]:
    """Transposed conv from ``coords``: onto ``target`` coordinates if given, else every reachable site."""
    dev = coords.device
    full_shape = transposed_output_shape(spatial_shape, kernel_size, stride, padding)
    s, p = torch.tensor(stride, device=dev), torch.tensor(padding, device=dev)
    offsets = kernel_offsets(kernel_size, centered=False, device=dev)
    if target is not None:
        out_shape = tuple(target_shape) if target_shape is not None else full_shape
        src_shape = torch.tensor(spatial_shape, device=dev)
        pairs = []
        with CoordIndex(coords, spatial_shape, batch_size) as index:
            for kappa in offsets:
                o, valid = _coarse_of(target, kappa, s, p, src_shape)
                src = torch.where(valid, index.lookup_coords(torch.where(valid[:, None], o, 0)), -1)
                out_rows = (src >= 0).nonzero().squeeze(1)
                pairs.append((src.index_select(0, out_rows), out_rows))
        in_idx, out_idx, bounds = _concat(pairs, dev)
        kmap = KernelMap(tuple(kernel_size), in_idx, out_idx, bounds, coords.shape[0], target.shape[0])
        return target, out_shape, kmap
    out_shape = full_shape
    osh = torch.tensor(out_shape, device=dev)
    cand_rows, cand_keys = [], []
    for kappa in offsets:
        t = coords[:, 1:] * s - p + kappa
        valid = ((t >= 0) & (t < osh)).all(1)
        rows = valid.nonzero().squeeze(1)
        cand_rows.append(rows)
        tc = torch.cat([coords[:, :1], t], 1).index_select(0, rows)
        cand_keys.append(linear_keys(tc, out_shape, batch_size))
    uniq, inverse = torch.unique(torch.cat(cand_keys), sorted=True, return_inverse=True)
    out_coords = decode_keys(uniq, out_shape)
    pairs = list(zip(cand_rows, inverse.split([r.numel() for r in cand_rows]), strict=True))
    in_idx, out_idx, bounds = _concat(pairs, dev)
    kmap = KernelMap(tuple(kernel_size), in_idx, out_idx, bounds, coords.shape[0], out_coords.shape[0])
    return out_coords, out_shape, kmap


# ---- cached entry points (what the layers call) -----------------------------------------------------------
@dataclass(eq=False)
class Level:
    """A derived coordinate set: coordinates, grid shape, stride and the cache every tensor on it shares."""

    coords: torch.Tensor
    spatial_shape: tuple[int, int, int]
    stride: tuple[int, int, int]
    cache: CoordinateCache


def submanifold_map(x: SparseTensor, kernel_size: Sequence[int]) -> KernelMap:
    key = ("subm", tuple(kernel_size))
    kmap = x.cache.get(key)
    if kmap is None:
        kmap = x.cache.put(key, build_submanifold_map(x.coords, x.spatial_shape, x.batch_size, kernel_size))
    return kmap


def strided_map(
    x: SparseTensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int]
) -> tuple[Level, KernelMap]:
    """Downsampling map and the output level. The output level's cache learns the reverse map, so a later
    transposed conv back onto ``x``'s coordinates (U-Net decoder) reuses it instead of rebuilding."""
    key = ("down", tuple(kernel_size), tuple(stride), tuple(padding))
    hit = x.cache.get(key)
    if hit is None:
        out_coords, out_shape, kmap = build_strided_map(
            x.coords, x.spatial_shape, x.batch_size, kernel_size, stride, padding
        )
        out_stride = tuple(a * b for a, b in zip(x.stride, stride, strict=True))
        level = Level(out_coords, out_shape, out_stride, CoordinateCache())
        level.cache.put(
            ("up", tuple(kernel_size), tuple(stride), tuple(padding), x.cache.serial), kmap.transpose()
        )
        hit = x.cache.put(key, (level, kmap))
    return hit


def transposed_map(
    x: SparseTensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    target: SparseTensor | None = None,
) -> tuple[Level, KernelMap]:
    ks, st, pd = tuple(kernel_size), tuple(stride), tuple(padding)
    out_stride = tuple(max(a // b, 1) for a, b in zip(x.stride, st, strict=True))
    if target is not None:
        key = ("up", ks, st, pd, target.cache.serial)
        kmap = x.cache.get(key)
        if kmap is None:
            _, _, kmap = build_transposed_map(
                x.coords, x.spatial_shape, x.batch_size, ks, st, pd, target.coords, target.spatial_shape
            )
            x.cache.put(key, kmap)
        return Level(target.coords, target.spatial_shape, target.stride, target.cache), kmap
    key = ("upgen", ks, st, pd)
    hit = x.cache.get(key)
    if hit is None:
        out_coords, out_shape, kmap = build_transposed_map(
            x.coords, x.spatial_shape, x.batch_size, ks, st, pd
        )
        level = Level(out_coords, out_shape, out_stride, CoordinateCache())
        if ks == st and not any(pd):
            # Non-overlapping children: downsampling them again gives back exactly x's sites, with these
            # pairs reversed, so the generated level can reuse the map.
            parent = Level(x.coords, x.spatial_shape, x.stride, x.cache)
            level.cache.put(("down", ks, st, pd), (parent, kmap.transpose()))
        hit = x.cache.put(key, (level, kmap))
    return hit
