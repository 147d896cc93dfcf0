"""Sparse voxel tensors and sparse convolution.

One canonical weight layout (`layout`), one neighbour-map builder with per-coordinate-set caching (`maps`),
and interchangeable conv backends (`backend`): ``torch`` (pure PyTorch, the exact reference), ``spconv`` and
``minkowski`` (when importable). See docs/sparse.md.
"""

from .backend import (
    BACKENDS,
    ENV_VAR,
    available_backends,
    backend_status,
    default_backend,
    resolve_backend,
)
from .layout import (
    coords_to_spconv,
    from_dense_conv3d,
    from_dense_conv_transpose3d,
    from_minkowski,
    from_spconv,
    to_dense_conv3d,
    to_dense_conv_transpose3d,
    to_minkowski,
    to_spconv,
)
from .maps import KernelMap, kernel_offsets, strided_map, submanifold_map, transposed_map
from .nn import (
    ChannelToSpace,
    SpaceToChannel,
    SparseActivation,
    SparseConv3d,
    SparseConvTranspose3d,
    SparseGELU,
    SparseGroupNorm,
    SparseLayerNorm,
    SparseLinear,
    SparsePrune,
    SparseReLU,
    SparseSiLU,
    SubMConv3d,
)
from .ops import channel_to_space, group_norm, prune, space_to_channel
from .tensor import CoordinateCache, SparseTensor

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "ChannelToSpace",
    "CoordinateCache",
    "KernelMap",
    "SpaceToChannel",
    "SparseActivation",
    "SparseConv3d",
    "SparseConvTranspose3d",
    "SparseGELU",
    "SparseGroupNorm",
    "SparseLayerNorm",
    "SparseLinear",
    "SparsePrune",
    "SparseReLU",
    "SparseSiLU",
    "SparseTensor",
    "SubMConv3d",
    "available_backends",
    "backend_status",
    "channel_to_space",
    "coords_to_spconv",
    "default_backend",
    "from_dense_conv3d",
    "from_dense_conv_transpose3d",
    "from_minkowski",
    "from_spconv",
    "group_norm",
    "kernel_offsets",
    "prune",
    "resolve_backend",
    "space_to_channel",
    "strided_map",
    "submanifold_map",
    "to_dense_conv3d",
    "to_dense_conv_transpose3d",
    "to_minkowski",
    "to_spconv",
    "transposed_map",
]
