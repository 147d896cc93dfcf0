"""The data stage's shading model, defined once: constants and the numpy implementation.

Blinn-Phong with PBR parameters: diffuse (1 - metallic) albedo, specular F0 = mix(0.04, albedo, metallic) with
shininess from roughness (2/r⁴ - 2, roughness clipped to [0.05, 1], shininess capped at 4096), point lights
(x, y, z, intensity) with soft distance falloff 1 / (1 + 0.08 d²), a hemispherical ambient term that brightens
up-facing surfaces (world z is up), then a soft tone map c / (1 + 0.35 c) and gamma 1/1.6. Normals are flipped to
face the eye. Inputs are world-frame, metres.

Layout: this module (numpy + math, nothing else of the data stage) holds the constants and `shade_np`, used by the
renderer; `interiorfusion_data.shading_torch` holds `shade_torch`, the same formula line for line in torch
(differentiable, CPU or CUDA, any float dtype). Two files rather than one so that neither path imports the
other's array library: the data workers never import torch, and the later stages that shade decoded voxels
import torch + math + these constants only (numpy, which torch itself depends on, comes with them; the renderer,
the scene model and the voxeliser do not).
"""

from __future__ import annotations

import math

import numpy as np

ROUGHNESS_MIN = 0.05
ROUGHNESS_MAX = 1.0
SHININESS_MAX = 4096.0
DIELECTRIC_F0 = 0.04
AMBIENT = 0.3  # hemispherical ambient: AMBIENT + AMBIENT_UP * n_z, times the diffuse colour
AMBIENT_UP = 0.06
AMBIENT_SPECULAR = 0.15  # constant specular ambient, times F0
FALLOFF = 0.08  # light energy: intensity / (1 + FALLOFF d²) · max(n·l, 0)
DIFFUSE_LIGHT = 0.6
SPECULAR_SCALE = 0.25
SPECULAR_MAX = 8.0  # cap of the normalised lobe (s + 8) / (8π) · (n·h)^s
HALF_EPS = 1e-6  # floor of |l + v| before normalising the half vector
NDH_FLOOR = 1e-6  # floor of n·h before the log
LOG_LOBE_FLOOR = -40.0  # floor of s · log(n·h): tiny powers would be denormal floats, very slow on CPUs
TONE = 0.35  # soft tone map c / (1 + TONE c)
GAMMA = 1.6  # output = clip(c, 0, 1) ** (1 / GAMMA)
SPEC_NORM = 8.0 * math.pi


def shade_np(position: np.ndarray, normal: np.ndarray, albedo: np.ndarray, metallic: np.ndarray,
             roughness: np.ndarray, eye: np.ndarray, lights: np.ndarray, normalize: bool = False) -> np.ndarray:
    """RGB (N, 3) float32 in [0, 1] (before 8-bit quantisation) of points seen from `eye`.

    position, normal, albedo (N, 3); metallic, roughness (N,); eye (3,) world position of the camera centre;
    lights (L, 4) [x, y, z, intensity]. Normals are expected unit length; `normalize=True` normalises them
    first (for averaged voxel normals). Component-wise float32 arithmetic: no reductions over length-3 axes,
    which are slow in numpy."""
    position = np.asarray(position, np.float32)
    albedo = np.asarray(albedo, np.float32)
    metal = np.asarray(metallic, np.float32)[:, None]
    rough = np.clip(np.asarray(roughness, np.float32), ROUGHNESS_MIN, ROUGHNESS_MAX)
    eye = np.asarray(eye, np.float32)
    px, py, pz = position[:, 0], position[:, 1], position[:, 2]
    nx, ny, nz = (np.asarray(normal[:, i], np.float32) for i in range(3))
    if normalize:
        inv = 1.0 / np.maximum(np.sqrt(nx * nx + ny * ny + nz * nz), np.float32(1e-12))
        nx, ny, nz = nx * inv, ny * inv, nz * inv
    vx, vy, vz = eye[0] - px, eye[1] - py, eye[2] - pz
    inv = 1.0 / np.sqrt(vx * vx + vy * vy + vz * vz)
    vx, vy, vz = vx * inv, vy * inv, vz * inv
    flip = np.where(nx * vx + ny * vy + nz * vz < 0, -1.0, 1.0).astype(np.float32)
    nx, ny, nz = nx * flip, ny * flip, nz * flip
    shininess = np.minimum(2.0 / rough**4 - 2.0, SHININESS_MAX)
    f0 = DIELECTRIC_F0 * (1 - metal) + albedo * metal
    diffuse = albedo * (1 - metal)
    color = diffuse * (AMBIENT + AMBIENT_UP * nz)[:, None] + f0 * AMBIENT_SPECULAR
    for light in np.asarray(lights).reshape(-1, 4).astype(np.float32):
        lx, ly, lz = light[0] - px, light[1] - py, light[2] - pz
        dist2 = lx * lx + ly * ly + lz * lz
        inv = 1.0 / np.sqrt(dist2)
        lx, ly, lz = lx * inv, ly * inv, lz * inv
        ndl = np.clip(nx * lx + ny * ly + nz * lz, 0, 1)
        hx, hy, hz = lx + vx, ly + vy, lz + vz
        inv = 1.0 / np.maximum(np.sqrt(hx * hx + hy * hy + hz * hz), HALF_EPS)
        ndh = np.clip((nx * hx + ny * hy + nz * hz) * inv, 0, 1)
        # ndh ** shininess via exp, floored: tiny powers would be denormal floats, which are very slow on CPUs.
        lobe = np.exp(np.maximum(shininess * np.log(np.maximum(ndh, NDH_FLOOR)), LOG_LOBE_FLOOR))
        spec = np.minimum((shininess + 8) / SPEC_NORM * lobe, SPECULAR_MAX) * SPECULAR_SCALE
        energy = light[3] / (1.0 + FALLOFF * dist2) * ndl
        color += energy[:, None] * (diffuse * DIFFUSE_LIGHT + f0 * spec[:, None])
    color = color / (1 + TONE * color)
    return (np.clip(color, 0, 1) ** (1 / GAMMA)).astype(np.float32, copy=False)
