"""Differentiable rendering of a decoded sparse surface (soft z-buffer splatting).

Each occupied voxel is a small disc at its centre. It is splatted into a 5×5 pixel window around its projection
with a Gaussian footprint sized by its projected radius; per pixel, voxels blend with weights
p · g · exp(-z / τ), so the front surface dominates while the weights stay differentiable in the
occupancy probabilities p and in any per-voxel features (normals, albedo). This is the same idea as SoftRas /
Pulsar, specialised to axis-aligned voxels, and needs no custom kernels.

Cameras follow the data format: OpenCV pinhole (x right, y down, z forward), pose = camera-to-world.

Precision: the projection runs in float32 (float64 when an input is float64) with autocast off, whatever the
dtype of the probabilities and features (bf16 under mixed precision). bf16 keeps 8 significant bits: between 4 and
8 m its values are 3.1 cm apart, three voxels of a 1024³ grid over 10.24 m, so points, depths, the splat weights
exp(-z / τ) (τ = one voxel) and depth edges would be noise at that scale. The results are float32 too, so a loss
that mixes them with bf16 terms promotes to float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

WINDOW = 2  # splat into a (2·WINDOW+1)² window


@dataclass
class SoftRender:
    depth: torch.Tensor  # (H, W) z-depth in metres, 0 where nothing covers the pixel
    alpha: torch.Tensor  # (H, W) coverage in [0, 1]
    features: torch.Tensor | None  # (H, W, C) blended per-voxel features


def soft_render(
    points: torch.Tensor,
    probs: torch.Tensor,
    K: torch.Tensor,
    cam_to_world: torch.Tensor,
    height: int,
    width: int,
    voxel_size: float,
    features: torch.Tensor | None = None,
    tau: float | None = None,
    near: float = 0.05,
) -> SoftRender:
    """points (P, 3) world voxel centres, probs (P,) occupancy probability, features (P, C)."""
    dtype = geometry_dtype(points, probs, K, cam_to_world, features)
    with torch.autocast(points.device.type, enabled=False):  # autocast would run the projection matmul in bf16
        return _soft_render(points.to(dtype), probs.to(dtype), K.to(dtype), cam_to_world, height, width,
                            voxel_size, features.to(dtype) if features is not None else None, tau, near)


def geometry_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float32, or float64 when a floating input is float64: never a half-precision type."""
    dtype = torch.float32
    for t in tensors:
        if t is not None and t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _soft_render(points: torch.Tensor, probs: torch.Tensor, K: torch.Tensor, cam_to_world: torch.Tensor,
                 height: int, width: int, voxel_size: float, features: torch.Tensor | None, tau: float | None,
                 near: float) -> SoftRender:
    dtype = points.dtype
    # Inverted in float64 (linalg.inv has no half-precision kernels, and the pose is tiny).
    world_to_cam = torch.linalg.inv(cam_to_world.to(torch.float64)).to(dtype)
    cam = points @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
    z = cam[:, 2]
    keep = z > near
    cam, z, probs = cam[keep], z[keep], probs[keep]
    feats = features[keep] if features is not None else None
    u = K[0, 0] * cam[:, 0] / z + K[0, 2]
    v = K[1, 1] * cam[:, 1] / z + K[1, 2]
    radius = (0.5 * voxel_size * K[0, 0] / z).clamp(0.5, WINDOW + 0.5)
    tau = tau if tau is not None else voxel_size
    offsets = torch.arange(-WINDOW, WINDOW + 1, device=points.device)
    oy, ox = torch.meshgrid(offsets, offsets, indexing="ij")
    px = (u.floor()[:, None] + ox.reshape(1, -1)).long()  # (P, 25)
    py = (v.floor()[:, None] + oy.reshape(1, -1)).long()
    d2 = (px + 0.5 - u[:, None]) ** 2 + (py + 0.5 - v[:, None]) ** 2
    g = torch.exp(-d2 / (2 * radius[:, None] ** 2))
    inside = (px >= 0) & (px < width) & (py >= 0) & (py < height) & (d2 <= (radius[:, None] + 0.5) ** 2)
    pix = (py * width + px)[inside]
    zz = z[:, None].expand_as(g)[inside]
    wg = (probs[:, None] * g)[inside]
    n = height * width
    # Per-pixel softmax over log(p·g) - z/τ, stabilised by each pixel's (detached) maximum.
    logw = torch.log(wg.clamp(min=1e-12)) - zz / tau
    peak = torch.full((n,), -float("inf"), dtype=dtype, device=points.device)
    peak = peak.scatter_reduce(0, pix, logw.detach(), reduce="amax")
    w = torch.exp(logw - peak[pix])
    wsum = torch.zeros(n, dtype=dtype, device=points.device).index_add(0, pix, w)
    depth = torch.zeros(n, dtype=dtype, device=points.device).index_add(0, pix, w * zz) / wsum.clamp(min=1e-8)
    cover = torch.zeros(n, dtype=dtype, device=points.device).index_add(0, pix, wg).clamp(max=1.0)
    out_feats = None
    if feats is not None:
        fz = feats[:, None, :].expand(-1, g.shape[1], -1)[inside]
        acc = torch.zeros(n, feats.shape[1], dtype=dtype, device=points.device).index_add(0, pix, w[:, None] * fz)
        out_feats = (acc / wsum.clamp(min=1e-8)[:, None]).reshape(height, width, -1)
    return SoftRender(depth.reshape(height, width), cover.reshape(height, width), out_feats)


def sobel_edges(image: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude of an (H, W) map, same size (replicate padding)."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=image.dtype, device=image.device)
    weight = torch.stack([kx, kx.T])[:, None] / 8.0
    padded = F.pad(image[None, None], (1, 1, 1, 1), mode="replicate")
    grad = F.conv2d(padded, weight)[0]
    return torch.sqrt(grad.pow(2).sum(0) + 1e-12)
