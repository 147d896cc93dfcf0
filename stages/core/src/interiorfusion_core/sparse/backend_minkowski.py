"""MinkowskiEngine 0.5 as an optional compute backend (used only when ``import MinkowskiEngine`` works).

ME builds its own kernel maps inside its coordinate manager, so this backend inserts our input and output
coordinate sets (scaled to finest-grid units, as ME expects) and maps ME's row order back to ours.
Supported: submanifold conv (odd k) and non-overlapping strided / transposed conv (k == stride, padding 0),
which is what ME's kernel regions express (odd k centred, even k over [0, k), times the tensor stride).
"""

from __future__ import annotations

from typing import Any

import torch

from .layout import to_minkowski
from .maps import KernelMap

_ME: Any = None
_IMPORT_ERROR: str | None = None


def _load() -> Any:
    global _ME, _IMPORT_ERROR
    if _ME is None and _IMPORT_ERROR is None:
        try:
            import MinkowskiEngine as me
        except Exception as exc:  # missing, or the known Python 3.11 `collections.Sequence` import failure
            _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
        else:
            _ME = me
    return _ME


def available() -> bool:
    return _load() is not None


def import_error() -> str | None:
    _load()
    return _IMPORT_ERROR


def _scaled(coords: torch.Tensor, stride: tuple[int, int, int]) -> torch.Tensor:
    s = torch.tensor([1, *stride], device=coords.device)
    return (coords * s).int().contiguous()


def sparse_conv(
    feats: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kmap: KernelMap,
    *,
    kind: str,
    in_coords: torch.Tensor,
    in_stride: tuple[int, int, int],
    out_coords: torch.Tensor,
    out_stride: tuple[int, int, int],
    stride: tuple[int, int, int],
    padding: tuple[int, int, int],
) -> torch.Tensor:
    me = _load()
    if me is None:
        raise RuntimeError(f"the minkowski sparse backend is not importable ({_IMPORT_ERROR})")
    ks = kmap.kernel_size
    if kind == "subm" and any(k % 2 == 0 for k in ks):
        raise NotImplementedError("minkowski backend: submanifold conv needs odd kernel sizes")
    if kind in ("down", "up") and (tuple(ks) != tuple(stride) or any(padding)):
        raise NotImplementedError(
            "minkowski backend supports strided/transposed conv only with kernel == stride and padding 0; "
            "use the torch or spconv backend for this layer"
        )
    map_type = me.CoordinateMapType.GPU if feats.is_cuda else me.CoordinateMapType.CPU
    manager = me.CoordinateManager(D=3, coordinate_map_type=map_type)
    in_key, (in_rows, _) = manager.insert_and_map(_scaled(in_coords, in_stride), list(in_stride))
    if kind == "subm":
        out_key, out_rows = in_key, in_rows
    else:
        out_key, (out_rows, _) = manager.insert_and_map(_scaled(out_coords, out_stride), list(out_stride))
    in_rows, out_rows = in_rows.long(), out_rows.long()
    generator = me.KernelGenerator(
        kernel_size=list(ks), stride=list(stride) if kind != "subm" else 1, dilation=1, dimension=3
    )
    fn = me.MinkowskiConvolutionTransposeFunction if kind == "up" else me.MinkowskiConvolutionFunction
    out_me = fn.apply(
        feats.index_select(0, in_rows).contiguous(),
        to_minkowski(weight, ks),
        generator,
        in_key,
        out_key,
        manager,
    )
    # ME's row j is our row out_rows[j]; index_copy is differentiable and keeps our order.
    out = out_me.new_zeros(kmap.n_out, out_me.shape[1]).index_copy(0, out_rows, out_me)
    return out + bias if bias is not None else out
