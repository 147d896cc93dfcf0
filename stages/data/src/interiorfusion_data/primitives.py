"""Triangle primitives (from trimesh, cached as unit shapes and transformed with numpy: fast and exact)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import trimesh

Mesh = tuple[np.ndarray, np.ndarray]


@lru_cache(maxsize=1)
def _unit_box() -> Mesh:
    m = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    return np.asarray(m.vertices, np.float64), np.asarray(m.faces, np.int64)


@lru_cache(maxsize=8)
def _unit_cylinder(sections: int) -> Mesh:
    # Radius 1, z from 0 to 1.
    m = trimesh.creation.cylinder(radius=1.0, height=1.0, sections=sections)
    v = np.asarray(m.vertices, np.float64).copy()
    v[:, 2] += 0.5
    return v, np.asarray(m.faces, np.int64)


@lru_cache(maxsize=4)
def _unit_sphere(subdivisions: int) -> Mesh:
    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=1.0)
    return np.asarray(m.vertices, np.float64), np.asarray(m.faces, np.int64)


def box(center: tuple[float, float, float] | np.ndarray, size: tuple[float, float, float] | np.ndarray) -> Mesh:
    """Axis-aligned box by centre and full extents; faces wound outward."""
    v, f = _unit_box()
    return v * np.asarray(size, np.float64) + np.asarray(center, np.float64), f


def box_between(lo: tuple[float, float, float], hi: tuple[float, float, float]) -> Mesh:
    lo_, hi_ = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    return box((lo_ + hi_) / 2, hi_ - lo_)


def cylinder(x: float, y: float, z0: float, radius: float, height: float, sections: int = 16,
             top_scale: float = 1.0) -> Mesh:
    """Vertical cylinder (or frustum when top_scale != 1) standing on z0."""
    v, f = _unit_cylinder(sections)
    v = v.copy()
    if top_scale != 1.0:
        top = v[:, 2] > 0.5
        v[top, :2] *= top_scale
    v[:, :2] *= radius
    v[:, 2] *= height
    v += (x, y, z0)
    return v, f


def ellipsoid(center: tuple[float, float, float], radii: tuple[float, float, float], subdivisions: int = 1) -> Mesh:
    v, f = _unit_sphere(subdivisions)
    return v * np.asarray(radii) + np.asarray(center), f


def quad(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, p3: np.ndarray) -> Mesh:
    """Planar quad p0→p1→p2→p3 (counter-clockwise seen from the side its normal points to)."""
    return np.stack([p0, p1, p2, p3]).astype(np.float64), np.array([[0, 1, 2], [0, 2, 3]], np.int64)


def merge(meshes: list[Mesh]) -> Mesh:
    verts, faces, n = [], [], 0
    for v, f in meshes:
        verts.append(v)
        faces.append(f + n)
        n += len(v)
    return np.concatenate(verts), np.concatenate(faces)
