"""Sparse surface voxeliser: triangles → occupied voxels with per-voxel material, never allocating N³.

A voxel is occupied iff its closed cube intersects a triangle (the exact triangle/box separating-axis test of
Akenine-Möller, evaluated only where it can succeed). Each triangle is walked like a rasteriser along its
dominant axis: the cells of its 2D bounding range on the other two axes are tested against the projected
triangle, each surviving cell yields the 1–3 voxels the triangle's plane crosses in that column, and those are
checked against the remaining axes. Work is proportional to surface area, not volume; open or closed meshes
alike. Candidates are packed into one int64 each — (linear voxel key, quantised distance from the voxel centre
to the triangle's plane, face index) — so one `np.sort` dedupes voxels and puts first the nearest triangle,
which owns the voxel and gives its material and normal. Triangles go in chunks of bounded candidate count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FACE_BITS = 25
DIST_BITS = 8
MAX_FACES = 1 << FACE_BITS
# Material channels per voxel: albedo RGB, metallic, roughness, normal XYZ.
CHANNELS = ("albedo_r", "albedo_g", "albedo_b", "metallic", "roughness", "normal_x", "normal_y", "normal_z")


@dataclass
class VoxelGrid:
    """Occupied voxels at resolution N: integer coords (M, 3) in [0, N), attributes (M, 8) float32.

    Voxel (i, j, k) covers [origin + (i, j, k) * voxel_size, origin + (i+1, j+1, k+1) * voxel_size) in metres.
    Coords are sorted by their linear key ((i * N) + j) * N + k.
    """

    coords: np.ndarray
    attrs: np.ndarray
    resolution: int
    origin: np.ndarray
    voxel_size: float

    def __len__(self) -> int:
        return len(self.coords)

    def centers(self) -> np.ndarray:
        return self.origin + (self.coords.astype(np.float64) + 0.5) * self.voxel_size


def fit_cube(lo: np.ndarray, hi: np.ndarray, margin: float = 0.05, size: float | None = None) -> tuple[np.ndarray,
                                                                                                           float]:
    """The metric bounding cube (origin, side) around [lo, hi]: centred, `margin` metres of air around it."""
    side = float(size) if size is not None else float((hi - lo).max()) + 2 * margin
    centre = (lo + hi) / 2
    return centre - side / 2, side


# Per dominant axis k: the (u, v, w) permutation with w = k.
_PERM = np.array([[1, 2, 0], [2, 0, 1], [0, 1, 2]])


def _ragged(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For counts [2, 3]: owners [0, 0, 1, 1, 1] and local offsets [0, 1, 0, 1, 2]."""
    total = int(counts.sum())
    owner = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    return owner, np.arange(total) - np.repeat(starts, counts)


def _edge_axes(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """2D separating axes of triangles p (F, 3, 2): per edge the normal (F, 3, 2), the triangle's interval on
    it (lo, hi: (F, 3)) and the half-width of a unit square on it (F, 3)."""
    e = np.roll(p, -1, axis=1) - p
    nrm = np.stack([-e[..., 1], e[..., 0]], axis=-1)
    on_edge = (nrm * p).sum(-1)
    opposite = (nrm * np.roll(p, 1, axis=1)).sum(-1)
    return nrm, np.minimum(on_edge, opposite), np.maximum(on_edge, opposite), 0.5 * np.abs(nrm).sum(-1)


def _sat_2d(axes: tuple[np.ndarray, ...], f: np.ndarray, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    """Do unit squares centred at (cx, cy) overlap triangles f on all three edge axes (closed intervals)?"""
    nrm, lo, hi, r = axes
    ok = np.ones(len(f), bool)
    for i in range(3):
        s = nrm[f, i, 0] * cx + nrm[f, i, 1] * cy
        ri = r[f, i]
        ok &= (s + ri >= lo[f, i]) & (s - ri <= hi[f, i])
    return ok


def voxelize(
    triangles: np.ndarray,
    face_attrs: np.ndarray,
    resolution: int,
    origin: np.ndarray,
    voxel_size: float,
    chunk_candidates: int = 3_000_000,
) -> VoxelGrid:
    """Surface occupancy of `triangles` (F, 3, 3) in metres at `resolution`; `face_attrs` (F, C) per face."""
    n_res = int(resolution)
    if len(triangles) >= MAX_FACES:
        raise ValueError(f"voxelize: at most {MAX_FACES - 1} faces per call, got {len(triangles)}")
    if 3 * int(np.ceil(np.log2(n_res))) + DIST_BITS + FACE_BITS > 63:
        raise ValueError(f"voxelize: resolution {n_res} too large")
    origin = np.asarray(origin, np.float64)
    tri = (np.asarray(triangles, np.float64) - origin) / voxel_size
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    lo, hi = tri.min(axis=1), tri.max(axis=1)
    keep = (np.abs(normal).max(axis=1) > 1e-12) & (hi >= 0).all(axis=1) & (lo <= n_res).all(axis=1)
    faces = np.flatnonzero(keep)
    # Dominant axis per face; (u, v) are the other two axes, w the dominant one.
    k = np.abs(normal[faces]).argmax(axis=1)
    perm = _PERM[k]
    tp = np.take_along_axis(tri[faces], perm[:, None, :], axis=2)
    np_ = np.take_along_axis(normal[faces], perm, axis=1)
    cell_lo = np.clip(np.floor(tp[:, :, :2].min(axis=1)), 0, n_res - 1).astype(np.int64)
    cell_hi = np.clip(np.floor(tp[:, :, :2].max(axis=1)), 0, n_res - 1).astype(np.int64)
    ncells = np.prod(cell_hi - cell_lo + 1, axis=1)
    axes_uv = _edge_axes(tp[:, :, :2])
    # The other six cross-product axes: edges projected onto the (v, w) and (w, u) planes.
    t_sel = tri[faces]
    axes_vw = _edge_axes(tp[:, :, [1, 2]])
    axes_wu = _edge_axes(tp[:, :, [2, 0]])
    slope = -np_[:, :2] / np_[:, 2:3]  # dw/du, dw/dv on the plane
    w_lo, w_hi = tp[:, :, 2].min(axis=1), tp[:, :, 2].max(axis=1)
    unit_n = normal[faces] / np.linalg.norm(normal[faces], axis=1, keepdims=True)

    packed_parts: list[np.ndarray] = []
    cum = np.cumsum(ncells)
    start = 0
    while start < len(faces):
        base = cum[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(cum, base + chunk_candidates, side="right")))
        sel = np.arange(start, stop)
        packed_parts.append(_chunk(sel, ncells, cell_lo, cell_hi, tp, slope, w_lo, w_hi, axes_uv, axes_vw, axes_wu,
                                   perm, t_sel, unit_n, faces, n_res))
        start = stop
    packed = np.sort(np.concatenate(packed_parts)) if packed_parts else np.zeros(0, np.int64)
    if not len(packed):
        return VoxelGrid(np.zeros((0, 3), np.uint16), np.zeros((0, face_attrs.shape[1]), np.float32), n_res,
                         origin, float(voxel_size))
    keys = packed >> (DIST_BITS + FACE_BITS)
    first = np.empty(len(keys), bool)
    first[0] = True
    first[1:] = keys[1:] != keys[:-1]
    keys, winners = keys[first], packed[first]
    face = (winners & (MAX_FACES - 1)).astype(np.int64)
    coords = np.stack([keys // (n_res * n_res), (keys // n_res) % n_res, keys % n_res], axis=1)
    dtype = np.uint16 if n_res <= 65535 else np.int32
    return VoxelGrid(coords.astype(dtype), np.asarray(face_attrs, np.float32)[face], n_res, origin, float(voxel_size))


def _chunk(sel: np.ndarray, ncells: np.ndarray, cell_lo: np.ndarray, cell_hi: np.ndarray, tp: np.ndarray,
           slope: np.ndarray, w_lo: np.ndarray, w_hi: np.ndarray, axes_uv: tuple, axes_vw: tuple, axes_wu: tuple,
           perm: np.ndarray, t_sel: np.ndarray, unit_n: np.ndarray, faces: np.ndarray, n_res: int) -> np.ndarray:
    owner, local = _ragged(ncells[sel])
    f = sel[owner]
    width = cell_hi[f, 0] - cell_lo[f, 0] + 1
    cu = cell_lo[f, 0] + local % width
    cv = cell_lo[f, 1] + local // width
    cxu, cxv = cu + 0.5, cv + 0.5
    ok = _sat_2d(axes_uv, f, cxu, cxv)
    f, cu, cv, cxu, cxv = f[ok], cu[ok], cv[ok], cxu[ok], cxv[ok]
    # The plane's w over this cell, clipped to the triangle's own w extent: the voxels it can touch.
    wc = tp[f, 0, 2] + slope[f, 0] * (cxu - tp[f, 0, 0]) + slope[f, 1] * (cxv - tp[f, 0, 1])
    half = 0.5 * (np.abs(slope[f, 0]) + np.abs(slope[f, 1]))
    k0 = np.floor(np.maximum(wc - half, w_lo[f]))
    k1 = np.floor(np.minimum(wc + half, w_hi[f]))
    # A face exactly on a voxel boundary touches both neighbours; keep the lower one's top face too.
    k0 = np.clip(k0, 0, n_res - 1).astype(np.int64)
    k1 = np.clip(k1, 0, n_res - 1).astype(np.int64)
    cnt = np.maximum(k1 - k0 + 1, 0)
    owner, local = _ragged(cnt)
    f, cu, cv, cw = f[owner], cu[owner], cv[owner], k0[owner] + local
    ok = _sat_2d(axes_vw, f, cxv[owner], cw + 0.5) & _sat_2d(axes_wu, f, cw + 0.5, cxu[owner])
    f, cu, cv, cw = f[ok], cu[ok], cv[ok], cw[ok]
    # Back to world axes.
    uvw = np.stack([cu, cv, cw], axis=1)
    vox = np.empty_like(uvw)
    np.put_along_axis(vox, perm[f], uvw, axis=1)
    c = vox + 0.5
    d = np.abs(((c - t_sel[f, 0]) * unit_n[f]).sum(axis=1))  # ≤ √3/2 for an overlapping voxel
    dq = np.minimum((d * ((1 << DIST_BITS) / 0.8661)).astype(np.int64), (1 << DIST_BITS) - 1)
    key = (vox[:, 0] * n_res + vox[:, 1]) * n_res + vox[:, 2]
    packed = (key << (DIST_BITS + FACE_BITS)) | (dq << FACE_BITS) | faces[f]
    packed = np.sort(packed)
    kk = packed >> (DIST_BITS + FACE_BITS)
    first = np.ones(len(kk), bool)
    first[1:] = kk[1:] != kk[:-1]
    return packed[first]


def downsample(coords: np.ndarray, attrs: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact coarsening by `factor` (a power of two): a parent is occupied iff any child is; its attributes are
    the mean of its children's (normals re-normalised). Input coords need not be sorted; output is sorted."""
    if factor == 1:
        return coords, attrs
    parent = coords.astype(np.int64) // factor
    span = int(parent.max()) + 1 if len(parent) else 1
    key = (parent[:, 0] * span + parent[:, 1]) * span + parent[:, 2]
    # Sort (key, index) packed in one int64: np.sort is far faster than argsort here.
    bits = max(1, len(key).bit_length())
    packed = np.sort((key << bits) | np.arange(len(key), dtype=np.int64))
    order = packed & ((1 << bits) - 1)
    key_sorted = packed >> bits
    first = np.empty(len(key_sorted), bool)
    if len(key_sorted):
        first[0] = True
        first[1:] = key_sorted[1:] != key_sorted[:-1]
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, len(key_sorted)))
    sums = np.add.reduceat(attrs[order].astype(np.float64), starts, axis=0) if len(starts) else attrs[:0]
    mean = (sums / counts[:, None]).astype(np.float32)
    if mean.shape[1] >= 8:
        n = mean[:, 5:8]
        norm = np.linalg.norm(n, axis=1, keepdims=True)
        mean[:, 5:8] = np.where(norm > 1e-6, n / np.maximum(norm, 1e-6), 0.0)
    out_coords = parent[order][starts].astype(coords.dtype)
    return out_coords, mean


def scene_face_attrs(face_material: np.ndarray, face_normals: np.ndarray) -> np.ndarray:
    return np.concatenate([face_material[:, :5], face_normals], axis=1).astype(np.float32)


# Stored form: uint8 per channel. Albedo/metallic/roughness x → round(255 x); normals n → round(127.5 (n + 1)).
def quantize_attrs(attrs: np.ndarray) -> np.ndarray:
    q = np.empty(attrs.shape, np.uint8)
    q[:, :5] = np.clip(np.round(attrs[:, :5] * 255.0), 0, 255)
    q[:, 5:8] = np.clip(np.round((attrs[:, 5:8] + 1.0) * 127.5), 0, 255)
    return q


def dequantize_attrs(q: np.ndarray) -> np.ndarray:
    a = q.astype(np.float32)
    a[:, :5] /= 255.0
    a[:, 5:8] = a[:, 5:8] / 127.5 - 1.0
    return a
