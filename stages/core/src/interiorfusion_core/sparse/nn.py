"""Sparse layers as ``torch.nn.Module``s: every layer is called with a `SparseTensor` and returns one.

The layers that own parameters are `SparseModule`s: `nn.Module.__call__`, where framework hooks run, sees their
features as plain tensors (see `SparseModule` for why).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import backend as _backend
from . import ops
from .maps import KernelMap, Level, strided_map, submanifold_map, transposed_map
from .tensor import SparseTensor, _triple


class SparseModule(nn.Module):
    """A sparse layer with parameters: called with a `SparseTensor` it returns one, while the hooks of
    `nn.Module.__call__` see only plain tensors.

    Why: DeepSpeed ZeRO-3 partitions weights between forward and backward and re-gathers a module's weights
    for its backward through autograd hooks on the tensors the module returns (and frees them through hooks on
    the tensors it receives). It finds tensors bare or inside tuples, lists and dicts only, and DeepSpeed has no
    way to register another container; a SparseTensor output would hide its features, and the backward would
    run on freed weights. Making SparseTensor look like a namedtuple or dict to DeepSpeed would tie the layers to
    its internals; plain tensors at the module boundary are what every hook-based wrapper (ZeRO-3, FSDP, forward
    hooks) understands. So `__call__` unpacks: `forward(feats, sparse=x, **kwargs)` receives the features
    positionally and the SparseTensor (coordinates, neighbour maps) and any other SparseTensor argument by
    keyword (DeepSpeed's forward pre-hooks see positional inputs only), and returns the output features; `prepare` names
    the coordinate set they lie on (the input's, by default). `forward` must compute from `feats`, never
    `sparse.feats`: the hooks may hand it a different tensor object than the one the caller passed.
    """

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(x, SparseTensor):
            return super().__call__(x, *args, **kwargs)
        level, extra = self.prepare(x, **kwargs)
        feats = super().__call__(x.feats, *args, sparse=x, **kwargs, **extra)
        return SparseTensor(level.coords, feats, level.spatial_shape, level.stride, x.batch_size, cache=level.cache)

    def prepare(self, x: SparseTensor, **kwargs: Any) -> tuple[SparseTensor | Level, dict[str, Any]]:
        """The output's coordinate set (the input's by default) and extra keyword arguments for `forward` (a
        neighbour map it needs too, so it is looked up once); must not use this module's parameters."""
        return x, {}


def _sparse_input(sparse: SparseTensor | None, layer: nn.Module) -> SparseTensor:
    if sparse is None:
        raise TypeError(f"{type(layer).__name__} is called with a SparseTensor (it needs its coordinates)")
    return sparse


class _ConvBase(SparseModule):
    """Holds the canonical weight [K, Cin, Cout] (see `layout`) and an optional bias [Cout]. `zero_init` starts the
    weight at zero (a residual branch that starts as the identity): set here rather than by the parent, because
    under `deepspeed.zero.Init` a layer's parameters are partitioned when its own constructor returns, and an
    in-place init done later by the parent would touch an empty tensor."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        bias: bool,
        backend: str | None,
        fan_in_divisor: int = 1,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _triple(kernel_size, "kernel_size")
        self.backend = backend  # None: resolved per call (argument > env var > device default)
        volume = math.prod(self.kernel_size)
        self.weight = nn.Parameter(torch.empty(volume, in_channels, out_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        # nn.Conv3d's default init (uniform +-1/sqrt(fan_in)), with fan_in = inputs that reach one output.
        bound = 1.0 / math.sqrt(max(in_channels * volume // fan_in_divisor, 1))
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)
        if zero_init:  # after the draw, so every later parameter's initial value is the same either way
            nn.init.zeros_(self.weight)

    def _params(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = self.weight.to(feats.dtype)
        b = self.bias.to(feats.dtype) if self.bias is not None else None
        return w, b

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"bias={self.bias is not None}, backend={self.backend or 'auto'}"
        )


class SubMConv3d(_ConvBase):
    """Submanifold conv (odd kernel): outputs exactly on the input's active voxels."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        bias: bool = True,
        backend: str | None = None,
        zero_init: bool = False,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, bias, backend, zero_init=zero_init)
        if any(k % 2 == 0 for k in self.kernel_size):
            raise ValueError(f"SubMConv3d needs odd kernel sizes, got {self.kernel_size}")

    def forward(self, feats: torch.Tensor, sparse: SparseTensor | None = None) -> torch.Tensor:
        x = _sparse_input(sparse, self)
        kmap = submanifold_map(x, self.kernel_size)
        geometry = _backend.ConvGeometry("subm", x.coords, x.stride, x.coords, x.stride, (1, 1, 1), (0, 0, 0))
        w, b = self._params(feats)
        return _backend.conv(feats, w, b, kmap, geometry, self.backend)


class _LevelConv(_ConvBase):
    """A conv from one level's voxels onto another's (strided or transposed); subclasses set stride/padding and
    `_map` (the output level and the neighbour map, both cached on the coordinate sets)."""

    stride: tuple[int, int, int]
    padding: tuple[int, int, int]
    kind: str

    def _map(self, x: SparseTensor, target: SparseTensor | None) -> tuple[Level, KernelMap]:
        raise NotImplementedError

    def prepare(self, x: SparseTensor, **kwargs: Any) -> tuple[Level, dict[str, Any]]:
        level, kmap = self._map(x, kwargs.get("target"))
        return level, {"mapped": (level, kmap)}

    def forward(self, feats: torch.Tensor, sparse: SparseTensor | None = None, target: SparseTensor | None = None,
                mapped: tuple[Level, KernelMap] | None = None) -> torch.Tensor:
        x = _sparse_input(sparse, self)
        level, kmap = mapped if mapped is not None else self._map(x, target)
        geometry = _backend.ConvGeometry(
            self.kind, x.coords, x.stride, level.coords, level.stride, self.stride, self.padding
        )
        w, b = self._params(feats)
        return _backend.conv(feats, w, b, kmap, geometry, self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stride={self.stride}, padding={self.padding}"


class SparseConv3d(_LevelConv):
    """Strided (downsampling) conv with ``F.conv3d`` semantics; output voxels are all cells any input reaches.
    Default kernel 2, stride 2: each parent cell from its 8 children."""

    kind = "down"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 2,
        stride: int | Sequence[int] = 2,
        padding: int | Sequence[int] = 0,
        bias: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, bias, backend)
        self.stride = _triple(stride, "stride")
        self.padding = _triple(padding, "padding")

    def _map(self, x: SparseTensor, target: SparseTensor | None) -> tuple[Level, KernelMap]:
        return strided_map(x, self.kernel_size, self.stride, self.padding)


class SparseConvTranspose3d(_LevelConv):
    """Transposed (upsampling) conv with ``F.conv_transpose3d`` semantics.

    ``up(x, target)`` writes onto ``target``'s voxels (e.g. the matching encoder level, whose
    downsampling map is reused from the cache); without a target, onto every reachable cell (kernel 2,
    stride 2: all 8 children of every input voxel).
    """

    kind = "up"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 2,
        stride: int | Sequence[int] = 2,
        padding: int | Sequence[int] = 0,
        bias: bool = True,
        backend: str | None = None,
    ) -> None:
        ks, st = _triple(kernel_size, "kernel_size"), _triple(stride, "stride")
        super().__init__(in_channels, out_channels, ks, bias, backend, fan_in_divisor=math.prod(st))
        self.stride = st
        self.padding = _triple(padding, "padding")

    def __call__(self, x: Any, target: SparseTensor | None = None) -> Any:
        return super().__call__(x, target=target)  # by keyword: see SparseModule

    def _map(self, x: SparseTensor, target: SparseTensor | None) -> tuple[Level, KernelMap]:
        return transposed_map(x, self.kernel_size, self.stride, self.padding, target)


class SpaceToChannel(nn.Module):
    """2x space-to-channel (C -> 8C on the parent grid); the child mask is kept on ``self.last_child_mask``
    only when ``keep_mask`` is set (pruning targets), to avoid holding it otherwise."""

    def __init__(self, keep_mask: bool = False) -> None:
        super().__init__()
        self.keep_mask = keep_mask
        self.last_child_mask: torch.Tensor | None = None

    def forward(self, x: SparseTensor) -> SparseTensor:
        out, mask = ops.space_to_channel(x)
        self.last_child_mask = mask if self.keep_mask else None
        return out


class ChannelToSpace(nn.Module):
    """2x channel-to-space (8C -> C on the children kept by ``child_mask``, or onto ``target``)."""

    def forward(
        self, x: SparseTensor, child_mask: torch.Tensor | None = None, target: SparseTensor | None = None
    ) -> SparseTensor:
        return ops.channel_to_space(x, child_mask, target)


class SparseGroupNorm(SparseModule, nn.GroupNorm):
    """GroupNorm with statistics per sample over that sample's active voxels (see `ops.group_norm`)."""

    def forward(self, feats: torch.Tensor, sparse: SparseTensor | None = None) -> torch.Tensor:  # type: ignore[override]
        x = _sparse_input(sparse, self)
        return ops.group_norm(x.replace(feats), self.num_groups, self.weight, self.bias, self.eps)


class SparseLayerNorm(SparseModule):
    """LayerNorm for sparse tensors.

    ``per_voxel=False`` (default): normalise over each sample's voxels and all channels (the dense-CNN
    "LayerNorm over C, X, Y, Z", i.e. GroupNorm with one group), per-channel affine.
    ``per_voxel=True``: ``nn.LayerNorm`` over the channels of each voxel (transformer-style).
    """

    def __init__(
        self, num_channels: int, eps: float = 1e-5, elementwise_affine: bool = True, per_voxel: bool = False
    ) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.per_voxel = per_voxel
        self.weight = nn.Parameter(torch.ones(num_channels)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels)) if elementwise_affine else None

    def forward(self, feats: torch.Tensor, sparse: SparseTensor | None = None) -> torch.Tensor:
        if self.per_voxel:
            return F.layer_norm(feats, (self.num_channels,), self.weight, self.bias, self.eps)
        x = _sparse_input(sparse, self)
        return ops.group_norm(x.replace(feats), 1, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, per_voxel={self.per_voxel}"


class SparseActivation(nn.Module):
    """Applies a feature-wise function (module or callable) to the features."""

    def __init__(self, fn: nn.Module | Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(self.fn(x.feats))


class SparseReLU(SparseActivation):
    def __init__(self, inplace: bool = False) -> None:
        super().__init__(nn.ReLU(inplace=inplace))


class SparseSiLU(SparseActivation):
    def __init__(self) -> None:
        super().__init__(nn.SiLU())


class SparseGELU(SparseActivation):
    def __init__(self, approximate: str = "none") -> None:
        super().__init__(nn.GELU(approximate=approximate))


class SparseLinear(SparseModule, nn.Linear):
    """Per-voxel linear layer (a 1x1x1 conv); called with a plain tensor, it is `nn.Linear`."""

    def forward(self, feats: torch.Tensor, sparse: SparseTensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return F.linear(feats, self.weight, self.bias)


class SparsePrune(nn.Module):
    """Keeps the voxels where the given boolean mask is True."""

    def forward(self, x: SparseTensor, keep: torch.Tensor) -> SparseTensor:
        return ops.prune(x, keep)
