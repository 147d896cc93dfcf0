"""Stage 3's losses: the seed's five terms on per-voxel materials (albedo RGB, metallic, roughness, normal XYZ) and
on images shaded from them.

Material terms compare the decoded prediction with the data's materials on the true voxels. The image terms shade
the sample's stored views the way the data stage rendered them (interiorfusion_data.shading_torch, the one shading
model, with the sample's stored lights): each pixel with depth is back-projected to the world point it saw, the
true voxel holding that point gives the material, and the shaded colour is compared with the stored RGB (MSE or L1)
and, as whole images, by LPIPS. Shading the true materials this way reproduces the stored RGB to the shading-parity
tolerance (docs/shading.md), so a perfect material prediction leaves only that residue in the rendering term.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from interiorfusion_core.config.base import DistanceTerm
from interiorfusion_data.shading_torch import shade_torch
from interiorfusion_material.perceptual import lpips_distance
from interiorfusion_vae.losses import distance as vae_distance

ALBEDO, METAL_ROUGH, NORMAL = slice(0, 3), slice(3, 5), slice(5, 8)


def distance(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean absolute (l1) or mean squared (mse) error, in fp32; 0 for no elements."""
    if pred.numel() == 0:
        return pred.float().sum() * 0.0
    return vae_distance(pred.float(), target.float(), kind)


def normal_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − |cos(pred, target)|, over the targets with a direction (length above 0.5: quantised unit normals).
    Sign-free, as the VAE's normal terms: a voxel's normal is an orientation (a wall voxel is seen from both
    sides, and the shading turns every normal towards the eye), so n and −n shade alike."""
    keep = target.float().norm(dim=1) > 0.5
    if not bool(keep.any()):
        return pred.float().sum() * 0.0
    cos = F.cosine_similarity(pred[keep].float(), target[keep].float(), dim=1, eps=1e-6)
    return (1.0 - cos.abs()).clamp_min(0).mean()


def material_terms(pred: torch.Tensor, target: torch.Tensor, albedo: DistanceTerm, metallic_roughness: DistanceTerm
                   ) -> dict[str, torch.Tensor]:
    """albedo, metallic_roughness and normal terms of pred vs target [V, 8] (rows aligned)."""
    return {"albedo": distance(pred[:, ALBEDO], target[:, ALBEDO], albedo.type),
            "metallic_roughness": distance(pred[:, METAL_ROUGH], target[:, METAL_ROUGH], metallic_roughness.type),
            "normal": normal_cosine(pred[:, NORMAL], target[:, NORMAL])}


# ------------------------------------------------------------------------------------------------ shaded views
@dataclass
class ViewPixels:
    """One stored view's pixels that see a true voxel: where they are in the (subsampled) image, the world points
    they saw and the rows of those voxels in the batch's voxel arrays."""

    sample: int
    view: int
    image: torch.Tensor  # [3, h, w] stored RGB (subsampled), in [0, 1]
    hit: torch.Tensor  # [h·w] bool: pixels with a material
    points: torch.Tensor  # [P, 3] world points, metres
    rows: torch.Tensor  # [P] rows into the batch's voxel coords / materials
    eye: torch.Tensor  # [3] camera centre
    lights: torch.Tensor  # [L, 4]


def _voxel_keys(coords: torch.Tensor, res: int) -> torch.Tensor:
    c = coords.long()
    return ((c[:, 0] * res + c[:, 1]) * res + c[:, 2]) * res + c[:, 3]


def view_pixels(batch: Mapping[str, Any], views: int, image_size: int) -> list[ViewPixels]:
    """The shading inputs of each sample's first `views` stored views (samples without stored lights or materials
    are left out). Uses `voxel_coords` [V, 4] (b, x, y, z) at `resolution`, `render_*` view stacks, `origin`,
    `voxel_size`, `lights` / `num_lights` / `has_lights` / `has_materials`."""
    res = int(batch["resolution"])
    coords = batch["voxel_coords"]
    keys = _voxel_keys(coords, res)
    order = torch.argsort(keys)
    sorted_keys = keys[order]
    out: list[ViewPixels] = []
    B = len(batch["num_tokens"])
    for b in range(B):
        if not bool(batch["has_lights"][b]) or not bool(batch["has_materials"][b]):
            continue
        lights = batch["lights"][b, : int(batch["num_lights"][b])].float()
        origin = batch["origin"][b].double()
        vs = float(batch["voxel_size"][b])
        for k in range(min(views, batch["render_depth"].shape[1])):
            depth = batch["render_depth"][b, k].double()
            H, W = depth.shape
            step = max(1, math.ceil(max(H, W) / image_size))
            rows_i = torch.arange(0, H, step, device=depth.device)
            cols_i = torch.arange(0, W, step, device=depth.device)
            d = depth[rows_i][:, cols_i]
            K = batch["render_intrinsics"][b, k].double()
            pose = batch["render_cam_to_world"][b, k].double()
            v, u = torch.meshgrid(rows_i.double(), cols_i.double(), indexing="ij")
            ray = torch.stack([(u + 0.5 - K[0, 2]) / K[0, 0], (v + 0.5 - K[1, 2]) / K[1, 1], torch.ones_like(u)], -1)
            world = (ray * d[..., None]) @ pose[:3, :3].T + pose[:3, 3]
            ijk = torch.floor((world - origin) / vs).long().reshape(-1, 3)
            inside = ((ijk >= 0) & (ijk < res)).all(1) & (d.reshape(-1) > 0)
            q = _voxel_keys(torch.cat([torch.full((len(ijk), 1), b, device=ijk.device), ijk.clamp(0, res - 1)], 1),
                            res)
            at = torch.searchsorted(sorted_keys, q).clamp(max=len(sorted_keys) - 1)
            hit = inside & (sorted_keys[at] == q)
            image = batch["render_rgb"][b, k][:, rows_i][:, :, cols_i].float()
            out.append(ViewPixels(b, k, image, hit, world.reshape(-1, 3)[hit].float(), order[at[hit]],
                                  pose[:3, 3].float(), lights))
    return out


def shade_pixels(pixels: ViewPixels, materials: torch.Tensor) -> torch.Tensor:
    """[P, 3] shaded colours of the view's hit pixels from per-voxel materials [V, 8] (fp32)."""
    m = materials[pixels.rows].float()
    return shade_torch(pixels.points, m[:, NORMAL], m[:, ALBEDO], m[:, 3], m[:, 4], pixels.eye, pixels.lights,
                       normalize=True)


def composite(pixels: ViewPixels, shaded: torch.Tensor) -> torch.Tensor:
    """The stored image with its hit pixels replaced by `shaded` ([3, h, w]): pixels without a material (no depth,
    no voxel) are the same in prediction and target, so only shading differences reach LPIPS."""
    full = pixels.image.reshape(3, -1).clone().to(shaded.dtype)
    full[:, pixels.hit] = shaded.T
    return full.reshape(pixels.image.shape)


def image_terms(pixels: list[ViewPixels], materials: torch.Tensor, rendering: DistanceTerm,
                perceptual_net: nn.Module | None) -> dict[str, torch.Tensor]:
    """rendering (MSE / L1 over hit pixels and channels) and perceptual (LPIPS of the composited images) of the
    shaded `materials` against the stored RGB. Empty `pixels`: zero terms that keep the graph."""
    zero = materials.float().sum() * 0.0
    if not pixels:
        return {"rendering": zero, "perceptual": zero}
    shaded = [shade_pixels(p, materials) for p in pixels]
    pred = torch.cat(shaded)
    target = torch.cat([p.image.reshape(3, -1)[:, p.hit].T for p in pixels])
    out = {"rendering": distance(pred, target, rendering.type) + zero}
    if perceptual_net is not None:
        preds = torch.stack([composite(p, s) for p, s in zip(pixels, shaded, strict=True)])
        targets = torch.stack([p.image for p in pixels])
        out["perceptual"] = lpips_distance(perceptual_net, preds, targets) + zero
    else:
        out["perceptual"] = zero
    return out


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR (dB) of colours in [0, 1]."""
    mse = float(((pred.float() - target.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)
