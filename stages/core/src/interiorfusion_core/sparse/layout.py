"""The canonical conv weight layout, and conversions to dense torch, spconv and MinkowskiEngine layouts.

Canonical: ``W[k, c_in, c_out]`` with ``K = kx * ky * kz`` and ``k = (ix * ky + iy) * kz + iz`` (C order over
the kernel index, x slowest, z fastest), acting on coordinates ``[batch, x, y, z]`` as a cross-correlation:

- submanifold (odd k):   ``out[u] = sum_k in[u + (i - (k-1)//2)] @ W[k]``
- strided:               ``out[o] = sum_k in[o*s - p + i] @ W[k]``             (= ``F.conv3d``)
- transposed:            ``out[o*s - p + i] += in[o] @ W[k]``                  (= ``F.conv_transpose3d``)

where ``i = (ix, iy, iz)``. The same tensor is the weight of all three; only the neighbour map differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _check(w: torch.Tensor, kernel_size: Sequence[int]) -> tuple[int, int, int]:
    kx, ky, kz = (int(k) for k in kernel_size)
    if w.dim() != 3 or w.shape[0] != kx * ky * kz:
        raise ValueError(f"canonical weight must be [K={kx * ky * kz}, Cin, Cout], got {tuple(w.shape)}")
    return kx, ky, kz


# ---- dense torch ------------------------------------------------------------------------------------------
def to_dense_conv3d(w: torch.Tensor, kernel_size: Sequence[int]) -> torch.Tensor:
    """Canonical -> ``F.conv3d`` weight [Cout, Cin, kx, ky, kz] for inputs [B, C, X, Y, Z]."""
    kx, ky, kz = _check(w, kernel_size)
    return w.reshape(kx, ky, kz, w.shape[1], w.shape[2]).permute(4, 3, 0, 1, 2).contiguous()


def from_dense_conv3d(w: torch.Tensor) -> torch.Tensor:
    cout, cin, kx, ky, kz = w.shape
    return w.permute(2, 3, 4, 1, 0).reshape(kx * ky * kz, cin, cout).contiguous()


def to_dense_conv_transpose3d(w: torch.Tensor, kernel_size: Sequence[int]) -> torch.Tensor:
    """Canonical -> ``F.conv_transpose3d`` weight [Cin, Cout, kx, ky, kz]."""
    kx, ky, kz = _check(w, kernel_size)
    return w.reshape(kx, ky, kz, w.shape[1], w.shape[2]).permute(3, 4, 0, 1, 2).contiguous()


def from_dense_conv_transpose3d(w: torch.Tensor) -> torch.Tensor:
    cin, cout, kx, ky, kz = w.shape
    return w.permute(2, 3, 4, 0, 1).reshape(kx * ky * kz, cin, cout).contiguous()


# ---- spconv 2.x -------------------------------------------------------------------------------------------
def to_spconv(w: torch.Tensor, kernel_size: Sequence[int]) -> torch.Tensor:
    """Canonical -> spconv 2.x weight [Cout, kz, ky, kx, Cin], for spconv run on ``[b, z, y, x]`` indices
    with spatial shape ``[Z, Y, X]`` (spconv's usual convention; its weight axes follow its index axes)."""
    kx, ky, kz = _check(w, kernel_size)
    return w.reshape(kx, ky, kz, w.shape[1], w.shape[2]).permute(4, 2, 1, 0, 3).contiguous()


def from_spconv(w: torch.Tensor) -> torch.Tensor:
    """spconv [Cout, kz, ky, kx, Cin] (on ``[b, z, y, x]`` indices) -> canonical [K, Cin, Cout]."""
    cout, kz, ky, kx, cin = w.shape
    return w.permute(3, 2, 1, 4, 0).reshape(kx * ky * kz, cin, cout).contiguous()


def coords_to_spconv(coords: torch.Tensor) -> torch.Tensor:
    """[b, x, y, z] -> spconv's [b, z, y, x] as contiguous int32.

    spconv reads the raw buffer and ignores strides: a non-contiguous index tensor (e.g. straight from
    ``nonzero()``, which is column-major in recent torch) silently gives garbage neighbour maps.
    """
    return coords[:, [0, 3, 2, 1]].to(torch.int32).contiguous()


# ---- MinkowskiEngine 0.5 ----------------------------------------------------------------------------------
def _minkowski_perm(kernel_size: Sequence[int]) -> torch.Tensor:
    """perm[m] = canonical index of MinkowskiEngine kernel index m (first spatial axis fastest)."""
    kx, ky, kz = (int(k) for k in kernel_size)
    ix, iy, iz = torch.meshgrid(torch.arange(kx), torch.arange(ky), torch.arange(kz), indexing="ij")
    canonical = (ix * ky + iy) * kz + iz  # [kx, ky, kz]
    # ME enumerates m = ix + kx * (iy + ky * iz): iterate iz slowest, ix fastest.
    return canonical.permute(2, 1, 0).reshape(-1)


def to_minkowski(w: torch.Tensor, kernel_size: Sequence[int]) -> torch.Tensor:
    """Canonical -> MinkowskiEngine kernel [K, Cin, Cout] with the first axis (x) fastest, for ME run on
    ``[b, x, y, z]`` coordinates (ME offsets: odd k centred, even k in [0, k), times the tensor stride)."""
    _check(w, kernel_size)
    return w.index_select(0, _minkowski_perm(kernel_size).to(w.device)).contiguous()


def from_minkowski(w: torch.Tensor, kernel_size: Sequence[int]) -> torch.Tensor:
    _check(w, kernel_size)
    inv = torch.argsort(_minkowski_perm(kernel_size)).to(w.device)
    return w.index_select(0, inv).contiguous()
