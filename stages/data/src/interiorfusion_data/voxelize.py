"""Sparse surface voxeliser: triangles → occupied voxels with per-voxel material, never allocating N³.

A voxel is occupied iff its closed cube intersects a triangle (the exact triangle/box separating-axis test of
Akenine-Möller, evaluated only where it can succeed). Each triangle is walked like a rasteriser along its
dominant axis: the cells of its 2D bounding range on the other two axes are tested against the projected
triangle, each surviving cell yields the 1–3 voxels the triangle's plane crosses in that column, and those are
checked against the remaining axes. Work is proportional to surface area, not volume; open or closed meshes
alike. Candidates are packed into one int64 each — (linear voxel key, quantised distance from the voxel centre
to the triangle's plane, face index) — so one `np.sort` dedupes voxels and puts first the nearest triangle,
which owns the voxel and gives its material and normal. Triangles go in chunks of bounded candidate count.

Labels (class, instance) are the area-weighted majority over the triangles touching the voxel: the class with
the largest total area of its triangles inside the voxel's closed cube, then that class's instance with the
largest area; ties go to the lower class id, then the lower instance id. Only voxels touched by more than one
(class, instance) need areas, so the exact triangle ∩ cube areas (a vectorised Sutherland–Hodgman clip) are
computed for those voxels' triangles alone; every other voxel takes its owner's label.
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
    labels: np.ndarray | None = None  # (M,) int16 class ids (interiorfusion_data.scene.CLASSES)
    instances: np.ndarray | None = None  # (M,) int32 instance ids, 0 = none

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
    face_class: np.ndarray | None = None,
    face_instance: np.ndarray | None = None,
) -> VoxelGrid:
    """Surface occupancy of `triangles` (F, 3, 3) in metres at `resolution`; `face_attrs` (F, C) per face.
    With `face_class` / `face_instance` (F,), every voxel also gets its majority label (module docstring)."""
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

    with_labels = face_class is not None
    packed_parts: list[np.ndarray] = []
    pair_parts: list[np.ndarray] = []
    cum = np.cumsum(ncells)
    start = 0
    while start < len(faces):
        base = cum[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(cum, base + chunk_candidates, side="right")))
        sel = np.arange(start, stop)
        winners, pairs = _chunk(sel, ncells, cell_lo, cell_hi, tp, slope, w_lo, w_hi, axes_uv, axes_vw, axes_wu,
                                perm, t_sel, unit_n, faces, n_res)
        packed_parts.append(winners)
        if with_labels:
            pair_parts.append(pairs)
        start = stop
    packed = np.sort(np.concatenate(packed_parts)) if packed_parts else np.zeros(0, np.int64)
    if not len(packed):
        empty = (np.zeros(0, np.int16), np.zeros(0, np.int32)) if with_labels else (None, None)
        return VoxelGrid(np.zeros((0, 3), np.uint16), np.zeros((0, face_attrs.shape[1]), np.float32), n_res,
                         origin, float(voxel_size), *empty)
    keys = packed >> (DIST_BITS + FACE_BITS)
    first = np.empty(len(keys), bool)
    first[0] = True
    first[1:] = keys[1:] != keys[:-1]
    keys, winners = keys[first], packed[first]
    face = (winners & (MAX_FACES - 1)).astype(np.int64)
    coords = np.stack([keys // (n_res * n_res), (keys // n_res) % n_res, keys % n_res], axis=1)
    dtype = np.uint16 if n_res <= 65535 else np.int32
    grid = VoxelGrid(coords.astype(dtype), np.asarray(face_attrs, np.float32)[face], n_res, origin, float(voxel_size))
    if with_labels:
        fc = np.asarray(face_class, np.int64)
        fi = np.zeros(len(fc), np.int64) if face_instance is None else np.asarray(face_instance, np.int64)
        pairs = np.concatenate(pair_parts)
        grid.labels, grid.instances = _voxel_labels(keys, face, pairs, tri, fc, fi, n_res)
    return grid


def _voxel_labels(keys: np.ndarray, owner: np.ndarray, pairs: np.ndarray, tri: np.ndarray, fc: np.ndarray,
                  fi: np.ndarray, n_res: int) -> tuple[np.ndarray, np.ndarray]:
    """Majority (class, instance) per voxel. `keys` (M,) sorted linear voxel keys, `owner` (M,) their nearest
    face, `pairs` every (voxel key << FACE_BITS | face) that touches; `tri` triangles in voxel units."""
    labels, instances = fc[owner], fi[owner]
    pair_key = pairs >> FACE_BITS
    pair_face = pairs & (MAX_FACES - 1)
    vidx = np.searchsorted(keys, pair_key)
    differ = (fc[pair_face] != labels[vidx]) | (fi[pair_face] != instances[vidx])
    if differ.any():
        mixed = np.zeros(len(keys), bool)
        mixed[vidx[differ]] = True
        sel = np.flatnonzero(mixed[vidx])
        v, f = vidx[sel], pair_face[sel]
        k = pair_key[sel]
        corner = np.stack([k // (n_res * n_res), (k // n_res) % n_res, k % n_res], axis=1).astype(np.float64)
        area = triangle_box_area(tri[f] - corner[:, None, :])
        # Integer weights (2⁻²⁰ of a voxel face): coplanar faces tie exactly instead of by rounding noise.
        weight = np.round(area * (1 << 20)).astype(np.int64)
        groups, cls, inst = majority(v, fc[f], fi[f], weight)
        labels[groups], instances[groups] = cls, inst
    return labels.astype(np.int16), instances.astype(np.int32)


def triangle_box_area(tri: np.ndarray) -> np.ndarray:
    """Area of each triangle (P, 3, 3) inside the closed unit cube [0, 1]³.

    Exact and dense: in the triangle's dominant-axis frame (u, v, w) it is clipped to 0 ≤ w ≤ 1 (only the few
    tilted triangles that cross those planes), the projected polygon's area inside the unit square in (u, v) is
    Green's theorem over its edges, ∮ −clamp(v, 0, 1)·1[0 ≤ u ≤ 1] du, and the area is rescaled by |n| / |n_w|."""
    nrm = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    k = np.abs(nrm).argmax(axis=1)
    perm = _PERM[k]
    tp = np.take_along_axis(tri, perm[:, None, :], axis=2)
    nw = np.abs(np.take_along_axis(nrm, k[:, None], axis=1)[:, 0])
    poly = np.zeros((len(tri), 5, 3))
    poly[:, :3] = tp
    n = np.full(len(tri), 3)
    w_lo, w_hi = tp[..., 2].min(axis=1), tp[..., 2].max(axis=1)
    cut = np.flatnonzero(((w_lo < 0) | (w_hi > 1)) & (w_hi >= 0) & (w_lo <= 1))
    if len(cut):
        sub, m = poly[cut], n[cut]
        for plane in (0.0, 1.0):
            sub, m = _clip_w(sub, m, plane)
        poly[cut], n[cut] = sub, m
    n[(w_hi < 0) | (w_lo > 1)] = 0
    slots = np.arange(5)[None]
    nxt = np.where(slots + 1 < n[:, None], slots + 1, 0)
    active = slots < n[:, None]
    xa, ya = poly[..., 0], poly[..., 1]
    xb, yb = np.take_along_axis(xa, nxt, axis=1), np.take_along_axis(ya, nxt, axis=1)
    p, q = np.clip(xa, 0, 1), np.clip(xb, 0, 1)
    dx = xb - xa
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(np.abs(dx) > 1e-12, (yb - ya) / dx, 0.0)
        yp, yq = ya + (p - xa) * slope, ya + (q - xa) * slope
        dy = yq - yp
        steep = np.abs(dy) > 1e-7
        integral = np.where(steep, (_clamp_antideriv(yq) - _clamp_antideriv(yp)) / np.where(steep, slope, 1.0),
                            np.clip(0.5 * (yp + yq), 0, 1) * (q - p))
    integral = np.where(active & (np.abs(dx) > 1e-12), integral, 0.0)
    area2d = np.abs(integral.sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(nw > 0, area2d * np.linalg.norm(nrm, axis=1) / nw, 0.0)


def _clamp_antideriv(y: np.ndarray) -> np.ndarray:
    """∫₀^y clamp(t, 0, 1) dt."""
    return np.where(y <= 0, 0.0, np.where(y >= 1, y - 0.5, 0.5 * y * y))


def _clip_w(poly: np.ndarray, n: np.ndarray, plane: float) -> tuple[np.ndarray, np.ndarray]:
    """Clip convex polygons (P, 5, 3) with `n` vertices to w ≥ 0 (plane 0) or w ≤ 1 (plane 1)."""
    rows = np.arange(len(poly))
    d = poly[..., 2] if plane == 0.0 else 1.0 - poly[..., 2]
    out = np.zeros_like(poly)
    cnt = np.zeros(len(poly), np.int64)
    for i in range(int(n.max()) if len(n) else 0):
        active = i < n
        j = np.where(i + 1 < n, i + 1, 0)
        cur, nxt = poly[:, i], poly[rows, j]
        dc, dn = d[:, i], d[rows, j]
        keep = active & (dc >= 0)
        out[rows[keep], cnt[keep]] = cur[keep]
        cnt += keep
        cross = active & ((dc >= 0) != (dn >= 0))
        t = dc[cross] / (dc[cross] - dn[cross])
        out[rows[cross], cnt[cross]] = cur[cross] + t[:, None] * (nxt[cross] - cur[cross])
        cnt += cross
    return out, cnt


def majority(group: np.ndarray, cls: np.ndarray, inst: np.ndarray, weight: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per distinct `group`: the class with the largest total weight (count when `weight` is None), then that
    class's instance with the largest weight; ties → the lower class id, then the lower instance id.
    Returns (groups sorted ascending, class, instance)."""
    group, cls, inst = (np.asarray(a, np.int64) for a in (group, cls, inst))
    if not len(group):
        return group, cls, inst
    w = np.ones(len(group), np.int64) if weight is None else np.asarray(weight, np.int64)
    ib = max(1, int(inst.max()).bit_length()) if len(inst) else 1
    cb = max(1, int(cls.max()).bit_length()) if len(cls) else 1
    gb = max(1, int(group.max()).bit_length()) if len(group) else 1
    if gb + cb + ib <= 62:
        packed = (group << (cb + ib)) | (cls << ib) | inst
        uniq, inv = np.unique(packed, return_inverse=True)
        tg, tc, ti = uniq >> (cb + ib), (uniq >> ib) & ((1 << cb) - 1), uniq & ((1 << ib) - 1)
    else:
        trip = np.stack([group, cls, inst], axis=1)
        uniq3, inv = np.unique(trip, axis=0, return_inverse=True)
        tg, tc, ti = uniq3[:, 0], uniq3[:, 1], uniq3[:, 2]
    tw = np.bincount(inv.ravel(), weights=None if weight is None else w, minlength=len(tg))
    tw = np.round(tw).astype(np.int64) if weight is not None else tw.astype(np.int64)
    # Class totals per (group, class): triples are sorted by (group, class, instance).
    gc_start = _starts((tg, tc))
    cw = np.add.reduceat(tw, gc_start)
    cg, cc = tg[gc_start], tc[gc_start]
    best_c = _first_max(cw, cg)  # index into class groups
    # The winning class's instances: the triples of the chosen (group, class) runs.
    run_of = np.repeat(np.arange(len(gc_start)), np.diff(np.append(gc_start, len(tg))))
    is_best = np.zeros(len(gc_start), bool)
    is_best[best_c] = True
    idx = np.flatnonzero(is_best[run_of])
    best_i = idx[_first_max(tw[idx], tg[idx])]
    return cg[best_c], cc[best_c], ti[best_i]


def _starts(keys: tuple[np.ndarray, ...]) -> np.ndarray:
    """Start indices of runs of equal key tuples (arrays already sorted together)."""
    n = len(keys[0])
    new = np.zeros(n, bool)
    if n:
        new[0] = True
        for k in keys:
            new[1:] |= k[1:] != k[:-1]
    return np.flatnonzero(new)


def _first_max(values: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Per run of equal `group` (sorted): the index of the first maximum of `values`."""
    starts = _starts((group,))
    counts = np.diff(np.append(starts, len(group)))
    top = np.repeat(np.maximum.reduceat(values, starts), counts)
    hit = np.flatnonzero(values == top)
    g = group[hit]
    first = np.ones(len(hit), bool)
    first[1:] = g[1:] != g[:-1]
    return hit[first]


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
    # Every (voxel, face) pair, for labels: the voxel key and the face, without the distance.
    pairs = (kk << FACE_BITS) | (packed & (MAX_FACES - 1))
    return packed[first], pairs


def downsample(coords: np.ndarray, attrs: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact coarsening by `factor` (a power of two): a parent is occupied iff any child is; its attributes are
    the mean of its children's (normals re-normalised). Input coords need not be sorted; output is sorted."""
    c, a, _, _ = downsample_labeled(coords, attrs, factor)
    return c, a


def downsample_labeled(coords: np.ndarray, attrs: np.ndarray, factor: int, labels: np.ndarray | None = None,
                       instances: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """`downsample`, and with `labels` / `instances` (M,) the parent's label: the class held by most children,
    then that class's most frequent instance among them; ties → the lower class id, then the lower instance."""
    if factor == 1:
        return coords, attrs, labels, instances
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
    out_labels = out_inst = None
    if labels is not None:
        lab = np.asarray(labels)[order].astype(np.int64)
        ins = (np.zeros(len(lab), np.int64) if instances is None else np.asarray(instances)[order].astype(np.int64))
        run = np.repeat(np.arange(len(starts)), counts)
        out_labels, out_inst = lab[starts], ins[starts]
        # Only parents whose children disagree need the vote.
        differ = (lab != out_labels[run]) | (ins != out_inst[run])
        if differ.any():
            mixed = np.zeros(len(starts), bool)
            mixed[run[differ]] = True
            sel = mixed[run]
            g, c, i = majority(run[sel], lab[sel], ins[sel])
            out_labels[g], out_inst[g] = c, i
        out_labels, out_inst = out_labels.astype(np.int16), out_inst.astype(np.int32)
    return out_coords, mean, out_labels, out_inst


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
