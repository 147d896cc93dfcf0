"""spconv 2.x as a compute backend: spconv's gather-GEMM-scatter kernels run on this package's neighbour maps.

Using our maps (converted to spconv's ``[2, K, P]`` pair table) keeps one coordinate order and one map cache
for every backend. Two defects of spconv 2.3.8's CPU path are worked around here, both verified by tests:

- its CPU scatter-add races when torch runs more than one thread (wrong sums, no error): every spconv call on
  CPU runs with ``torch.set_num_threads(1)``, restored afterwards;
- its backward calls ``torch.cuda.current_stream()`` even for CPU tensors (raises without a GPU): during CPU
  calls spconv's stream getter is swapped for one that returns the null stream, which its CPU path ignores.

(A third, in its own map builder rather than here: indices must be contiguous, see `layout.coords_to_spconv`.)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .maps import KernelMap

_LOCK = threading.RLock()  # re-entrant: a guarded call inside a guarded block must not deadlock
_IMPORT_ERROR: str | None = None
_ops: Any = None


def available() -> bool:
    return _load() is not None


def import_error() -> str | None:
    _load()
    return _IMPORT_ERROR


def _load() -> Any:
    global _ops, _IMPORT_ERROR
    if _ops is None and _IMPORT_ERROR is None:
        try:
            from spconv.pytorch import ops
        except Exception as exc:  # any import failure (missing, ABI mismatch) just means "not available"
            _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
        else:
            _ops = ops
    return _ops


@contextlib.contextmanager
def cpu_guard(device: torch.device) -> Iterator[None]:
    """One torch thread and a null CUDA stream around a spconv call on CPU; nothing on GPU."""
    if device.type != "cpu":
        yield
        return
    ops = _load()
    with _LOCK:  # set_num_threads and the module patch are process-wide
        threads = torch.get_num_threads()
        stream_fn = ops.get_current_stream
        torch.set_num_threads(1)
        ops.get_current_stream = lambda: 0
        try:
            yield
        finally:
            ops.get_current_stream = stream_fn
            torch.set_num_threads(threads)


def pair_table(kmap: KernelMap, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """spconv's Native-algorithm pairs: int32 [2, K, P] (row 0 input, row 1 output, -1 padded) and
    int32 [K] counts; cached on the map. For a submanifold map the centre offset is the identity."""
    cached = kmap.extra.get("spconv")
    if cached is not None:
        return cached
    counts = kmap.counts()
    width = max(max(counts, default=0), 1)
    table = torch.full((2, kmap.volume, width), -1, dtype=torch.int32, device=device)
    for k in range(kmap.volume):
        if k == kmap.identity:
            rows = torch.arange(kmap.n_in, dtype=torch.int32, device=device)
            table[0, k, : kmap.n_in] = rows
            table[1, k, : kmap.n_in] = rows
            continue
        i, o = kmap.pairs(k)
        table[0, k, : i.numel()] = i.to(torch.int32)
        table[1, k, : o.numel()] = o.to(torch.int32)
    num = torch.tensor(counts, dtype=torch.int32, device=device)
    kmap.extra["spconv"] = (table.contiguous(), num)
    return kmap.extra["spconv"]


def _is_subm(kmap: KernelMap) -> bool:
    # spconv's subm mode assumes the identity sits at the centre and mirrored offsets have equal counts.
    return kmap.identity >= 0 and kmap.identity == kmap.volume // 2 and kmap.n_in == kmap.n_out


class _SpconvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feats, weight, kmap):  # type: ignore[override]
        ops = _load()
        # spconv's "KRSC" layout: [Cout, K, Cin]; K in our offset order because the pairs are ours.
        filters = weight.permute(2, 0, 1).contiguous()
        feats = feats.contiguous()
        pairs, num = pair_table(kmap, feats.device)
        subm = _is_subm(kmap)
        with cpu_guard(feats.device):
            out = ops.indice_conv(feats, filters, pairs, num, kmap.n_out, False, subm)
        ctx.save_for_backward(feats, filters)
        ctx.kmap = kmap
        ctx.subm = subm
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        ops = _load()
        feats, filters = ctx.saved_tensors
        pairs, num = pair_table(ctx.kmap, feats.device)
        with cpu_guard(feats.device):
            d_in, d_filters = ops.indice_conv_backward(
                feats, filters, grad_out.contiguous(), pairs, num, False, ctx.subm
            )
        d_weight = d_filters.reshape(filters.shape).permute(1, 2, 0)
        return d_in, d_weight, None


def sparse_conv(
    feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kmap: KernelMap
) -> torch.Tensor:
    if _load() is None:
        raise RuntimeError(f"the spconv sparse backend is not importable ({_IMPORT_ERROR})")
    if kmap.n_out == 0 or kmap.n_in == 0:
        out = feats.new_zeros(kmap.n_out, weight.shape[2]) + 0 * weight.sum()
    else:
        out = _SpconvFn.apply(feats, weight, kmap)
    # spconv's CPU kernels take no bias; adding it here is one cheap elementwise op on either device.
    return out + bias if bias is not None else out
