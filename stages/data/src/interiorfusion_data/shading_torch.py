"""The data stage's shading model in torch: `shade_torch`, line for line the formula of `shading.shade_np`.

Differentiable in albedo, metallic, roughness and normal (the clips have zero gradient outside their range, as
torch.clamp does), on CPU or CUDA, in the inputs' float dtype. Imports torch, math and the constants of
`interiorfusion_data.shading` only, so the later stages (rendering losses, rewards, image metrics) can shade
decoded voxels without importing the data stage's renderer. See `shading` for the model and its constants.
"""

from __future__ import annotations

import torch

from interiorfusion_data.shading import (
    AMBIENT,
    AMBIENT_SPECULAR,
    AMBIENT_UP,
    DIELECTRIC_F0,
    DIFFUSE_LIGHT,
    FALLOFF,
    GAMMA,
    HALF_EPS,
    LOG_LOBE_FLOOR,
    NDH_FLOOR,
    ROUGHNESS_MAX,
    ROUGHNESS_MIN,
    SHININESS_MAX,
    SPEC_NORM,
    SPECULAR_MAX,
    SPECULAR_SCALE,
    TONE,
)


def shade_torch(position: torch.Tensor, normal: torch.Tensor, albedo: torch.Tensor, metallic: torch.Tensor,
                roughness: torch.Tensor, eye: torch.Tensor, lights: torch.Tensor,
                normalize: bool = False) -> torch.Tensor:
    """RGB (..., 3) in [0, 1] of points seen from `eye`.

    position, normal, albedo (..., 3), e.g. [N, 3]; metallic, roughness (...,); eye (3,) or broadcastable to
    position (one camera centre per point); lights (L, 4) [x, y, z, intensity] (L = 0: ambient only). Computes in
    position's dtype on its device. `normalize=True` normalises the normals first (decoded voxel normals are
    averages, not unit length); the renderer's face normals are unit and are shaded as given."""
    dtype, device = position.dtype, position.device
    albedo = albedo.to(dtype)
    metal = metallic.to(dtype)[..., None]
    rough = roughness.to(dtype).clamp(ROUGHNESS_MIN, ROUGHNESS_MAX)
    eye = eye.to(device=device, dtype=dtype)
    lights = lights.to(device=device, dtype=dtype).reshape(-1, 4)
    px, py, pz = position[..., 0], position[..., 1], position[..., 2]
    normal = normal.to(dtype)
    nx, ny, nz = normal[..., 0], normal[..., 1], normal[..., 2]
    if normalize:
        inv = 1.0 / torch.sqrt(nx * nx + ny * ny + nz * nz).clamp_min(1e-12)
        nx, ny, nz = nx * inv, ny * inv, nz * inv
    vx, vy, vz = eye[..., 0] - px, eye[..., 1] - py, eye[..., 2] - pz
    inv = 1.0 / torch.sqrt(vx * vx + vy * vy + vz * vz)
    vx, vy, vz = vx * inv, vy * inv, vz * inv
    flip = torch.where(nx * vx + ny * vy + nz * vz < 0, -1.0, 1.0).to(dtype).detach()
    nx, ny, nz = nx * flip, ny * flip, nz * flip
    shininess = (2.0 / rough**4 - 2.0).clamp_max(SHININESS_MAX)
    f0 = DIELECTRIC_F0 * (1 - metal) + albedo * metal
    diffuse = albedo * (1 - metal)
    color = diffuse * (AMBIENT + AMBIENT_UP * nz)[..., None] + f0 * AMBIENT_SPECULAR
    for light in lights:
        lx, ly, lz = light[0] - px, light[1] - py, light[2] - pz
        dist2 = lx * lx + ly * ly + lz * lz
        inv = 1.0 / torch.sqrt(dist2)
        lx, ly, lz = lx * inv, ly * inv, lz * inv
        ndl = (nx * lx + ny * ly + nz * lz).clamp(0, 1)
        hx, hy, hz = lx + vx, ly + vy, lz + vz
        inv = 1.0 / torch.sqrt(hx * hx + hy * hy + hz * hz).clamp_min(HALF_EPS)
        ndh = ((nx * hx + ny * hy + nz * hz) * inv).clamp(0, 1)
        # ndh ** shininess via exp of a floored log, as in shade_np (the same values, and finite gradients).
        lobe = torch.exp((shininess * torch.log(ndh.clamp_min(NDH_FLOOR))).clamp_min(LOG_LOBE_FLOOR))
        spec = ((shininess + 8) / SPEC_NORM * lobe).clamp_max(SPECULAR_MAX) * SPECULAR_SCALE
        energy = light[3] / (1.0 + FALLOFF * dist2) * ndl
        color = color + energy[..., None] * (diffuse * DIFFUSE_LIGHT + f0 * spec[..., None])
    color = color / (1 + TONE * color)
    # clamp_min before the power: x ** (1/γ) has an infinite derivative at 0.
    return color.clamp(0, 1).clamp_min(torch.finfo(dtype).tiny) ** (1 / GAMMA)
