"""The metric voxel frame and the conversions voxels ↔ metres ↔ camera pixels (docs/data-format.md, "Frame").

Every scene is voxelised in a cube of fixed side `cube_size` metres (default 10.24 m: 1 cm voxels at 1024³),
z up (gravity-aligned), the scene's bounding box centred horizontally and its floor `floor_height` metres above
the cube's bottom face. So at a given resolution a voxel index has the same metric meaning in every scene:
voxel size = cube_size / N, floor at voxel height floor(floor_height / voxel size).

    frame = VoxelFrame.from_meta(sample["meta"])
    xyz = frame.voxel_to_world(coords, 1024)              # voxel centres, metres (float64)
    ijk = frame.world_to_voxel(xyz, 1024)                 # the voxels holding those points
    uv, depth = world_to_pixel(xyz, K, cam_to_world)      # continuous pixel coords, z-depth in metres
    xyz2 = pixel_to_world(uv, depth, K, cam_to_world)

Pixel convention (the renderer's): pixel (u, v) covers [u, u + 1) × [v, v + 1), its centre is (u + 0.5, v + 0.5);
cameras are OpenCV pinholes (x right, y down, z forward), `cam_to_world` 4×4 (inverted exactly, so a float32
pose that is not quite orthonormal still round-trips). All numpy math is float64 whatever the input dtype (stored
poses and intrinsics are float32); the torch helpers default to float64 too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from interiorfusion_core.errors import UserError

# Defaults of the metric frame (config.VoxelSection): 10.24 m → 1 cm voxels at 1024³, 16 cm at 64³; the floor
# 24.5 cm above the cube's bottom: mid-voxel at 1024³ (24.5 voxels), so never on a voxel boundary at any level.
CUBE_SIZE = 10.24
FLOOR_HEIGHT = 0.245


@dataclass(frozen=True)
class VoxelFrame:
    """A sample's voxel frame: voxel (i, j, k) at resolution N covers origin + [i, i+1) × [j, j+1) × [k, k+1)
    times cube_size / N metres. `floor_z` is the floor's world height (None when unknown)."""

    origin: np.ndarray
    cube_size: float
    floor_z: float | None = None
    kind: str = "metric"

    def voxel_size(self, resolution: int) -> float:
        return float(self.cube_size) / int(resolution)

    def voxel_to_world(self, coords: np.ndarray, resolution: int) -> np.ndarray:
        """Centres (…, 3) float64 metres of integer voxel coords (…, 3) at `resolution`."""
        c = np.asarray(coords, np.float64)
        return np.asarray(self.origin, np.float64) + (c + 0.5) * self.voxel_size(resolution)

    def world_to_grid(self, points: np.ndarray, resolution: int) -> np.ndarray:
        """Continuous voxel coordinates (…, 3) float64 of world points: voxel centres sit at i + 0.5."""
        p = np.asarray(points, np.float64)
        return (p - np.asarray(self.origin, np.float64)) / self.voxel_size(resolution)

    def world_to_voxel(self, points: np.ndarray, resolution: int) -> np.ndarray:
        """Integer voxel coords (…, 3) int64 of the voxels holding world points (may lie outside [0, N))."""
        return np.floor(self.world_to_grid(points, resolution)).astype(np.int64)

    def floor_voxel(self, resolution: int) -> int | None:
        """The voxel height (k index) of the floor at `resolution`."""
        if self.floor_z is None:
            return None
        return int(np.floor((self.floor_z - float(self.origin[2])) / self.voxel_size(resolution)))

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> VoxelFrame:
        """The frame of a decoded sample's `meta.json` (older samples without `frame`: kind "fit", no floor)."""
        frame = meta.get("frame") or {}
        floor = frame.get("floor_z")
        return cls(np.asarray(meta["origin"], np.float64), float(meta["cube_size"]),
                   None if floor is None else float(floor), str(frame.get("kind", "fit")))

    def to_meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "up": "+z",
                "floor_z": None if self.floor_z is None else round(float(self.floor_z), 9),
                "floor_height": None if self.floor_z is None else round(float(self.floor_z - self.origin[2]), 9)}


def metric_frame(lo: np.ndarray, hi: np.ndarray, cube_size: float = CUBE_SIZE, floor_height: float = FLOOR_HEIGHT,
                 margin: float = 0.0, name: str = "scene", floor_z: float | None = None) -> VoxelFrame:
    """The fixed metric cube for a scene with bounds [lo, hi] (z up): centred horizontally on the bounds, the
    floor (`floor_z`, default the lowest point lo[2]) `floor_height` above the bottom face. A scene that does not
    fit with `margin` metres of air at the sides and top is refused (UserError naming it)."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    floor = float(lo[2]) if floor_z is None else float(floor_z)
    side = float(cube_size)
    centre = (lo + hi) / 2
    origin = np.array([centre[0] - side / 2, centre[1] - side / 2, floor - floor_height])
    ext = hi - lo
    need = max(float(ext[0]), float(ext[1])) + 2 * margin
    top = float(hi[2]) - floor + floor_height + margin
    if need > side or top > side or float(lo[2]) < origin[2]:
        raise UserError(
            f"scene {name} does not fit the metric voxel cube: it spans {ext[0]:.2f} × {ext[1]:.2f} m and rises "
            f"{float(hi[2]) - floor:.2f} m above its floor, but voxel.cube_size is {side:g} m (floor "
            f"{floor_height:g} m above the bottom, {margin:g} m margin); raise voxel.cube_size or leave the scene out")
    return VoxelFrame(origin, side, floor, "metric")


def fit_frame(lo: np.ndarray, hi: np.ndarray, margin: float = 0.05) -> VoxelFrame:
    """The per-scene cube (opt-in, `voxel.cube_size: fit`): the bounds plus `margin`, centred. No fixed scale."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    side = float((hi - lo).max()) + 2 * margin
    return VoxelFrame((lo + hi) / 2 - side / 2, side, float(lo[2]), "fit")


def world_to_pixel(points: np.ndarray, K: np.ndarray, cam_to_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World points (…, 3) → continuous pixel coords uv (…, 2) and z-depth (…,) metres, float64.
    Points behind the camera get depth ≤ 0 (their uv is meaningless)."""
    p = np.asarray(points, np.float64)
    pose = np.asarray(cam_to_world, np.float64)
    R, t = pose[:3, :3], pose[:3, 3]
    # The exact inverse, not Rᵀ: a float32-stored rotation is orthonormal only to ~1e-7, and Rᵀ would cost
    # ~6e-5 voxel at 1024³ on the way back through pixel_to_world.
    cam = (p - t) @ np.linalg.inv(R).T
    z = cam[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        img = cam @ np.asarray(K, np.float64).T
        uv = img[..., :2] / z[..., None]
    return uv, z


def pixel_to_world(uv: np.ndarray, depth: np.ndarray, K: np.ndarray, cam_to_world: np.ndarray) -> np.ndarray:
    """Continuous pixel coords uv (…, 2) (a pixel's centre is index + 0.5) and z-depth (…,) metres → world points
    (…, 3) float64."""
    uv = np.asarray(uv, np.float64)
    z = np.asarray(depth, np.float64)
    pose = np.asarray(cam_to_world, np.float64)
    ray = np.concatenate([uv, np.ones((*uv.shape[:-1], 1))], axis=-1) @ np.linalg.inv(np.asarray(K, np.float64)).T
    cam = ray * z[..., None]
    return cam @ pose[:3, :3].T + pose[:3, 3]


# ---------------------------------------------------------------------------------------------- torch
def voxel_to_world_torch(coords: Any, origin: Any, voxel_size: Any, dtype: Any = None) -> Any:
    """Torch: centres of voxel coords (…, 3), given origin (…, 3) and voxel size (…) broadcastable (float64 by
    default; pass dtype=torch.float32 for speed: ≤ 1e-4 voxel of error at 1024³, see docs)."""
    import torch

    dtype = dtype or torch.float64
    o = torch.as_tensor(origin, dtype=dtype, device=coords.device)
    s = torch.as_tensor(voxel_size, dtype=dtype, device=coords.device)
    return o + (coords.to(dtype) + 0.5) * s[..., None]


def world_to_pixel_torch(points: Any, K: Any, cam_to_world: Any, dtype: Any = None) -> tuple[Any, Any]:
    """Torch `world_to_pixel`: points (…, 3), K (3, 3), cam_to_world (4, 4) → uv (…, 2), z-depth (…)."""
    import torch

    dtype = dtype or torch.float64
    p = points.to(dtype)
    k = torch.as_tensor(K).to(p.device, dtype)
    pose = torch.as_tensor(cam_to_world).to(p.device, dtype)
    cam = (p - pose[:3, 3]) @ torch.linalg.inv(pose[:3, :3]).T
    z = cam[..., 2]
    img = cam @ k.T
    return img[..., :2] / z[..., None], z


def pixel_to_world_torch(uv: Any, depth: Any, K: Any, cam_to_world: Any, dtype: Any = None) -> Any:
    """Torch `pixel_to_world`: uv (…, 2), z-depth (…) → world points (…, 3)."""
    import torch

    dtype = dtype or torch.float64
    uv = uv.to(dtype)
    k = torch.as_tensor(K).to(uv.device, dtype)
    pose = torch.as_tensor(cam_to_world).to(uv.device, dtype)
    ray = torch.cat([uv, torch.ones_like(uv[..., :1])], dim=-1) @ torch.linalg.inv(k).T
    cam = ray * depth.to(dtype)[..., None]
    return cam @ pose[:3, :3].T + pose[:3, 3]
