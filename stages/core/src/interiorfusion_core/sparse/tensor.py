"""`SparseTensor`: active voxel coordinates + per-voxel features + grid metadata.

Coordinates are integer rows ``[batch, x, y, z]`` on a grid of ``spatial_shape`` cells at the tensor's level;
``stride`` is the cell size in finest-grid voxels (1 at full resolution, 2 after one 2x downsample, ...).
Every coordinate set owns one `CoordinateCache`; tensors that share coordinates (``x.replace(feats)``)
share it, so neighbour maps are built once per coordinate set and reused by every layer that needs them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch

_SERIAL = itertools.count()


class CoordinateCache:
    """Per-coordinate-set store for neighbour maps and lookups, keyed by (kind, kernel, stride, ...).

    The key is the coordinate set's identity (this object, with a never-reused serial number) plus the
    operation's geometry; a content hash is not needed because every op derives coordinates through it.
    """

    __slots__ = ("_maps", "hits", "misses", "serial")

    def __init__(self) -> None:
        self.serial = next(_SERIAL)
        self._maps: dict[tuple, Any] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> Any:
        value = self._maps.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: tuple, value: Any) -> Any:
        self._maps[key] = value
        return value

    def keys(self) -> list[tuple]:
        return list(self._maps)

    def clear(self) -> None:
        self._maps.clear()

    def __len__(self) -> int:
        return len(self._maps)

    def __repr__(self) -> str:
        return (
            f"CoordinateCache(#{self.serial}, {len(self._maps)} maps, hits={self.hits}, misses={self.misses})"
        )


def _triple(v: int | Sequence[int], name: str) -> tuple[int, int, int]:
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(a) for a in v)
    if len(t) != 3:
        raise ValueError(f"{name} must be an int or 3 ints, got {v!r}")
    return t  # type: ignore[return-value]


class SparseTensor:
    """A batch of sparse voxel grids: ``coords`` [N, 4] int (batch, x, y, z) and ``feats`` [N, C]."""

    # No __slots__: under ZeRO-3, DeepSpeed calls vars() on every module output that is not a tensor, list, tuple
    # or dict (looking for parameters a module returns), which raises for a slotted class. Its backward hooks never
    # look inside a SparseTensor, which is why the layers that own parameters exchange plain tensors at their
    # module boundary (nn.SparseModule).

    def __init__(
        self,
        coords: torch.Tensor,
        feats: torch.Tensor,
        spatial_shape: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        batch_size: int | None = None,
        cache: CoordinateCache | None = None,
        check: bool = False,
    ) -> None:
        if coords.dim() != 2 or coords.shape[1] != 4:
            raise ValueError(f"coords must be [N, 4] (batch, x, y, z), got {tuple(coords.shape)}")
        if coords.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"coords must be int32 or int64, got {coords.dtype}")
        if feats.dim() != 2 or feats.shape[0] != coords.shape[0]:
            raise ValueError(f"feats must be [N, C] with N={coords.shape[0]}, got {tuple(feats.shape)}")
        # int64 everywhere inside: keys are linearised into int64 and index ops want int64.
        self.coords = coords.long().contiguous()
        self.feats = feats
        self.spatial_shape = _triple(spatial_shape, "spatial_shape")
        self.stride = _triple(stride, "stride")
        if batch_size is None:
            batch_size = int(self.coords[:, 0].max().item()) + 1 if self.coords.shape[0] else 1
        self.batch_size = int(batch_size)
        self.cache = cache if cache is not None else CoordinateCache()
        if check:
            self.validate()

    # ---- construction helpers -------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, dense: torch.Tensor, stride: int | Sequence[int] = 1) -> SparseTensor:
        """[B, C, X, Y, Z] dense grid -> sparse tensor of the cells where any channel is non-zero."""
        if dense.dim() != 5:
            raise ValueError(f"dense must be [B, C, X, Y, Z], got {tuple(dense.shape)}")
        active = (dense != 0).any(1)
        # nonzero() returns a column-major tensor in recent torch; make it row-major for everyone downstream.
        coords = active.nonzero().contiguous()
        feats = dense.permute(0, 2, 3, 4, 1)[active]
        return cls(coords, feats, dense.shape[2:], stride, batch_size=dense.shape[0])

    @classmethod
    def from_occupancy(
        cls, occupancy: torch.Tensor, feats: torch.Tensor | None = None, stride: int = 1
    ) -> SparseTensor:
        """[B, X, Y, Z] boolean grid -> sparse tensor; features default to ones [N, 1]."""
        coords = occupancy.nonzero().contiguous()
        if feats is None:
            feats = torch.ones(coords.shape[0], 1, device=occupancy.device)
        return cls(coords, feats, occupancy.shape[1:], stride, batch_size=occupancy.shape[0])

    def replace(self, feats: torch.Tensor) -> SparseTensor:
        """Same coordinates (and neighbour-map cache), new features."""
        if feats.shape[0] != self.coords.shape[0]:
            raise ValueError(f"replace: feats has {feats.shape[0]} rows, tensor has {self.coords.shape[0]}")
        return SparseTensor(
            self.coords, feats, self.spatial_shape, self.stride, self.batch_size, cache=self.cache
        )

    # ---- properties -----------------------------------------------------------------------------------
    @property
    def num_voxels(self) -> int:
        return self.coords.shape[0]

    @property
    def num_channels(self) -> int:
        return self.feats.shape[1]

    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    @property
    def batch_index(self) -> torch.Tensor:
        return self.coords[:, 0]

    def batch_counts(self) -> torch.Tensor:
        """Voxels per sample, [batch_size]."""
        return torch.bincount(self.coords[:, 0], minlength=self.batch_size)

    def __len__(self) -> int:
        return self.coords.shape[0]

    def __repr__(self) -> str:
        return (
            f"SparseTensor(N={self.num_voxels}, C={self.num_channels}, shape={self.spatial_shape}, "
            f"stride={self.stride}, batch={self.batch_size}, dtype={self.dtype}, device={self.device})"
        )

    # ---- conversions ----------------------------------------------------------------------------------
    def to(self, *args: Any, **kwargs: Any) -> SparseTensor:
        """Move/cast features (and move coordinates with them); a device move drops the map cache."""
        feats = self.feats.to(*args, **kwargs)
        coords = self.coords.to(feats.device)
        cache = self.cache if coords.device == self.coords.device else None
        return SparseTensor(coords, feats, self.spatial_shape, self.stride, self.batch_size, cache=cache)

    def dense(self) -> torch.Tensor:
        """[B, C, X, Y, Z] dense grid (zeros where inactive); for tests and small grids only."""
        b, x, y, z = self.coords.unbind(1)
        out = self.feats.new_zeros(self.batch_size, *self.spatial_shape, self.num_channels)
        out = out.index_put((b, x, y, z), self.feats)
        return out.permute(0, 4, 1, 2, 3).contiguous()

    def sorted(self) -> SparseTensor:
        """Rows in lexicographic (batch, x, y, z) order; the order every op in this package produces."""
        order = torch.argsort(linear_keys(self.coords, self.spatial_shape, self.batch_size))
        return SparseTensor(
            self.coords[order], self.feats[order], self.spatial_shape, self.stride, self.batch_size
        )

    def validate(self) -> None:
        """Raise ValueError unless coordinates are inside the grid and unique."""
        c = self.coords
        if c.shape[0] == 0:
            return
        lo = c.min(0).values
        hi = c.max(0).values
        if lo.min() < 0:
            raise ValueError(f"negative coordinates: min per column {lo.tolist()}")
        limits = [self.batch_size, *self.spatial_shape]
        for axis, (h, lim) in enumerate(zip(hi.tolist(), limits, strict=True)):
            if h >= lim:
                raise ValueError(f"coordinate column {axis} reaches {h}, outside [0, {lim})")
        keys = linear_keys(c, self.spatial_shape, self.batch_size)
        if torch.unique(keys).numel() != keys.numel():
            raise ValueError("duplicate coordinates in sparse tensor")


def linear_keys(
    coords: torch.Tensor, spatial_shape: Sequence[int], batch_size: int, pad: int = 0
) -> torch.Tensor:
    """int64 key ``((b*X + x)*Y + y)*Z + z`` on a grid padded by ``pad`` cells per side.

    Order-preserving (lexicographic in b, x, y, z); with padding, a neighbour offset is a constant key shift.
    """
    del batch_size  # the batch is the most significant digit: no bound needed
    sx, sy, sz = (int(s) + 2 * pad for s in spatial_shape)
    c = coords.long()
    return ((c[:, 0] * sx + (c[:, 1] + pad)) * sy + (c[:, 2] + pad)) * sz + (c[:, 3] + pad)
