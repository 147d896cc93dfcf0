"""The condition depth lifted into the latent grid: which cells the camera saw a surface in, and which its rays
crossed as free space. Both flows get these two values per token (per cell, or per cell of a patch) beside their
noised input: with the camera and the frame known, the visible part of the room is geometry, not something the
network has to learn to read from image tokens.

A depth of 0 is "no measurement", so a view without depth (generation from an image alone, or the depth modality
dropped for guidance) lifts to all zeros, which is what the flows learn for "depth unknown".
"""

from __future__ import annotations

import torch

# Free-space samples per ray, at these fractions of the measured depth (the surface itself is 1.0).
FREE_FRACTIONS = (0.15, 0.3, 0.45, 0.6, 0.75, 0.9)
MAX_RAYS = 4096  # pixels lifted per view (a strided subset of a larger image)
CHANNELS = 2  # surface, free


@torch.no_grad()
def lift_depth(depth: torch.Tensor, K: torch.Tensor, cam_to_world: torch.Tensor, origin: torch.Tensor,
               cube_size: torch.Tensor, grid: int) -> torch.Tensor:
    """depth [B, H, W] metres (0 = none), K [B, 3, 3], cam_to_world [B, 4, 4] (OpenCV), origin [B, 3], cube_size
    [B] → [B, R, R, R, 2] in {0, 1}: a depth point fell in the cell / a ray crossed it before its surface (a cell
    with a surface point is not free)."""
    B, H, W = depth.shape
    device = depth.device
    out = torch.zeros(B, grid, grid, grid, CHANNELS, device=device)
    stride = max(1, int(((H * W) / MAX_RAYS) ** 0.5 + 0.999))
    ys, xs = torch.meshgrid(torch.arange(0, H, stride, device=device), torch.arange(0, W, stride, device=device),
                            indexing="ij")
    for b in range(B):
        z = depth[b, ys, xs].double()
        valid = z > 0
        if not bool(valid.any()):
            continue
        u, v, z = xs[valid].double() + 0.5, ys[valid].double() + 0.5, z[valid]
        k = K[b].double()
        rays = torch.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], torch.ones_like(u)], -1)  # z = 1
        pose = cam_to_world[b].double()
        scale = grid / float(cube_size[b])
        for channel, fractions in ((0, (1.0,)), (1, FREE_FRACTIONS)):
            for f in fractions:
                cam = rays * (z * f)[:, None]
                world = cam @ pose[:3, :3].T + pose[:3, 3]
                cell = torch.floor((world - origin[b].double()) * scale).long()
                inside = ((cell >= 0) & (cell < grid)).all(-1)
                c = cell[inside]
                out[b, c[:, 0], c[:, 1], c[:, 2], channel] = 1.0
    out[..., 1] *= 1.0 - out[..., 0]
    return out


def cell_values(lifted: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """[B, R, R, R, C] at packed cells coords [T, 4] (sample, x, y, z) → [T, C]."""
    c = coords.long()
    return lifted[c[:, 0], c[:, 1], c[:, 2], c[:, 3]]


def patch_values(lifted: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, R, R, R, C] → [B·(R/p)³, C·p³], in the token order of `model.patchify` (channel-major per token)."""
    from interiorfusion_structure.model import patchify

    return torch.cat([patchify(lifted[..., ch], patch)[0] for ch in range(lifted.shape[-1])], dim=1)


__all__ = ["CHANNELS", "cell_values", "lift_depth", "patch_values"]
