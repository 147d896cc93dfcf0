"""Backend choice for sparse convs: an explicit argument, else ``INTERIORFUSION_SPARSE_BACKEND``, else the
device default (``spconv`` for CUDA tensors when spconv imports, ``torch`` otherwise).

Every backend consumes the same canonical weight [K, Cin, Cout] and produces rows in the same order, so a
checkpoint or a model can switch backends freely; only speed differs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import backend_minkowski, backend_spconv, backend_torch
from .maps import KernelMap

ENV_VAR = "INTERIORFUSION_SPARSE_BACKEND"
BACKENDS = ("torch", "spconv", "minkowski")


def backend_status() -> dict[str, str | None]:
    """name -> None if usable here, else why not."""
    return {
        "torch": None,
        "spconv": None if backend_spconv.available() else backend_spconv.import_error(),
        "minkowski": None if backend_minkowski.available() else backend_minkowski.import_error(),
    }


def available_backends() -> list[str]:
    return [name for name, why in backend_status().items() if why is None]


def default_backend(device: torch.device | str | None = None) -> str:
    device = torch.device(device) if device is not None else None
    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if cuda and backend_spconv.available():
        return "spconv"
    return "torch"


def resolve_backend(name: str | None = None, device: torch.device | str | None = None) -> str:
    """The backend to use: ``name`` if given, else the environment variable, else `default_backend`."""
    source = "argument"
    if not name:
        name, source = os.environ.get(ENV_VAR, "").strip().lower(), ENV_VAR
    if not name or name == "auto":
        return default_backend(device)
    if name not in BACKENDS:
        raise ValueError(
            f"unknown sparse backend {name!r} (from {source}); choose one of {', '.join(BACKENDS)}"
        )
    why = backend_status()[name]
    if why is not None:
        raise RuntimeError(f"sparse backend {name!r} (from {source}) is not usable here: {why}")
    return name


@dataclass(frozen=True)
class ConvGeometry:
    """What a backend that keeps its own coordinate maps (MinkowskiEngine) needs besides the pair lists."""

    kind: str  # "subm" | "down" | "up"
    in_coords: torch.Tensor
    in_stride: tuple[int, int, int]
    out_coords: torch.Tensor
    out_stride: tuple[int, int, int]
    stride: tuple[int, int, int]
    padding: tuple[int, int, int]


def conv(
    feats: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kmap: KernelMap,
    geometry: ConvGeometry,
    backend: str | None = None,
) -> torch.Tensor:
    """Run one sparse conv with the resolved backend; features in, features out (in kmap's row order).

    Under autocast the conv runs like a matmul does: inputs in the autocast dtype, autocast off inside (the
    backends' `out=` matmuls and scatter-adds would otherwise mix the autocast dtype with the inputs' dtype)."""
    device_type = feats.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        feats, weight = feats.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return _run(feats, weight, bias, kmap, geometry, backend)
    return _run(feats, weight, bias, kmap, geometry, backend)


def _run(
    feats: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kmap: KernelMap,
    geometry: ConvGeometry,
    backend: str | None,
) -> torch.Tensor:
    name = resolve_backend(backend, feats.device)
    if name == "torch":
        return backend_torch.sparse_conv(feats, weight, bias, kmap)
    if name == "spconv":
        return backend_spconv.sparse_conv(feats, weight, bias, kmap)
    return backend_minkowski.sparse_conv(
        feats,
        weight,
        bias,
        kmap,
        kind=geometry.kind,
        in_coords=geometry.in_coords,
        in_stride=geometry.in_stride,
        out_coords=geometry.out_coords,
        out_stride=geometry.out_stride,
        stride=geometry.stride,
        padding=geometry.padding,
    )
