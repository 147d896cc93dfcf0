"""CPU condition renderer: an exact ray caster, vectorised like a rasteriser.

For each triangle the pixels of its projected (near-clipped) bounding range are candidates; each candidate ray
(through the pixel centre) is tested against the triangle exactly (signs of the ray against the three edge
planes through the camera centre, then the plane intersection), so triangles straddling the camera plane need
no clipping. A z-buffer keeps the nearest hit. Every map comes from the winning face index: depth, normal,
semantic class, instance, and an RGB image shaded from the face's PBR material.

Conventions: OpenCV camera (x right, y down, z forward), pose = camera-to-world, pixel (u, v) has its centre at
(u + 0.5, v + 0.5). **Depth is z-depth**: the distance along the optical axis in metres (not the ray length);
0 where a ray hits nothing. Normals are unit vectors in the camera frame, flipped to face the camera.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from interiorfusion_data.scene import Camera, Scene, point_in_polygon
from interiorfusion_data.shading import shade_np

NEAR = 0.05
FAR = 100.0


def mat3(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """x @ m for x (..., 3) and m (3, 3), without BLAS: for tall thin arrays a threaded GEMM call costs far
    more than these three multiply-adds (and contends for the cores with the data workers)."""
    m = m.astype(x.dtype, copy=False)
    return x[..., 0:1] * m[0] + x[..., 1:2] * m[1] + x[..., 2:3] * m[2]


def intrinsics(width: int, height: int, fov_deg: float) -> np.ndarray:
    """Square pixels; `fov_deg` is the horizontal field of view."""
    f = (width / 2) / math.tan(math.radians(fov_deg) / 2)
    return np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], np.float64)


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray = np.array([0.0, 0.0, 1.0])) -> np.ndarray:
    """Camera-to-world pose (OpenCV axes) at `eye` looking at `target`."""
    z = target - eye
    z = z / np.linalg.norm(z)
    x = np.cross(z, up)
    if np.linalg.norm(x) < 1e-6:
        x = np.cross(z, np.array([0.0, 1.0, 0.0]))
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = x, y, z, eye
    return pose


@dataclass
class RenderOutput:
    rgb: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray  # (H, W) float32 metres (z-depth), 0 = no hit
    normal: np.ndarray  # (H, W, 3) float32 camera frame, 0 = no hit
    semantic: np.ndarray  # (H, W) uint8 class id, 0 = void
    instance: np.ndarray  # (H, W) int32, 0 = none
    face: np.ndarray  # (H, W) int64 face index, -1 = no hit


def ray_directions(K: np.ndarray, width: int, height: int) -> np.ndarray:
    """Camera-frame directions with z = 1 through pixel centres, (H*W, 3)."""
    u = (np.arange(width) + 0.5 - K[0, 2]) / K[0, 0]
    v = (np.arange(height) + 0.5 - K[1, 2]) / K[1, 1]
    uu, vv = np.meshgrid(u, v)
    return np.stack([uu.ravel(), vv.ravel(), np.ones(uu.size)], axis=1)


def _ragged(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """counts [2, 3] → owners [0, 0, 1, 1, 1], offsets [0, 1, 0, 1, 2] (int32)."""
    owner = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    starts = (np.cumsum(counts) - counts).astype(np.int32)
    return owner, np.arange(int(counts.sum()), dtype=np.int32) - np.repeat(starts, counts)


TILE = 8


def raycast(triangles: np.ndarray, camera: Camera, cull_backfaces: bool = False,
            chunk: int = 3_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Nearest face index (H*W,) (-1 = none) and its z-depth (H*W,) for every pixel.

    `cull_backfaces` skips faces whose winding normal points away from the camera: exact for consistently
    oriented meshes (the procedural scenes), wrong for unoriented scans, so off by default."""
    w, h, K = camera.width, camera.height, camera.K
    R, t = camera.pose[:3, :3], camera.pose[:3, 3]
    v = mat3(triangles - t, R)  # camera frame
    z = v[..., 2]
    front = z > NEAR
    keep = front.any(axis=1)
    n_all = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    if cull_backfaces:
        keep &= (n_all * v[:, 0]).sum(axis=1) < 0
    # Near-clip for the bounding range: vertices in front, plus edge crossings of the near plane.
    pts = [v[:, i] for i in range(3)]
    valid = [front[:, i] for i in range(3)]
    for i in range(3):
        a, b = v[:, i], v[:, (i + 1) % 3]
        za, zb = a[:, 2], b[:, 2]
        cross = (za > NEAR) != (zb > NEAR)
        s = np.where(cross, (NEAR - za) / np.where(cross, zb - za, 1.0), 0.0)
        pts.append(a + (b - a) * s[:, None])
        valid.append(cross)
    P = np.stack(pts, axis=1)  # (F, 6, 3)
    V = np.stack(valid, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        px = K[0, 0] * P[..., 0] / P[..., 2] + K[0, 2]
        py = K[1, 1] * P[..., 1] / P[..., 2] + K[1, 2]
    big = 1e9
    umin = np.where(V, px, big).min(axis=1)
    umax = np.where(V, px, -big).max(axis=1)
    vmin = np.where(V, py, big).min(axis=1)
    vmax = np.where(V, py, -big).max(axis=1)
    # Pixel centres inside [min, max]: u + 0.5 in range.
    u0 = np.clip(np.ceil(umin - 0.5), 0, w).astype(np.int64)
    u1 = np.clip(np.floor(umax - 0.5), -1, w - 1).astype(np.int64)
    v0 = np.clip(np.ceil(vmin - 0.5), 0, h).astype(np.int64)
    v1 = np.clip(np.floor(vmax - 0.5), -1, h - 1).astype(np.int64)
    keep &= (u1 >= u0) & (v1 >= v0)
    faces = np.flatnonzero(keep)
    u0, u1, v0, v1 = (x[faces].astype(np.int32) for x in (u0, u1, v0, v1))
    # Per-face ray tests: edge planes through the camera centre (s_k = E_k · d), and the triangle's plane.
    vf = v[faces]
    e = np.stack([np.cross(vf[:, 0], vf[:, 1]), np.cross(vf[:, 1], vf[:, 2]), np.cross(vf[:, 2], vf[:, 0])], axis=1)
    n = n_all[faces]
    c = (n * vf[:, 0]).sum(axis=1)
    coef = np.concatenate([e.reshape(-1, 9), n, c[:, None]], axis=1).astype(np.float32)
    # Ray directions are (dx, dy, 1): dx depends on the column only, dy on the row only.
    ux = ((np.arange(w) + 0.5 - K[0, 2]) / K[0, 0]).astype(np.float32)
    vy = ((np.arange(h) + 0.5 - K[1, 2]) / K[1, 1]).astype(np.float32)
    # Big triangles waste most of their bounding range: walk it in TILE×TILE tiles and drop the tiles an edge
    # function rules out (it is linear in (dx, dy), so its extremes over a tile are at the tile's corners).
    tw = (u1 - u0) // TILE + 1
    th = (v1 - v0) // TILE + 1
    ntiles = tw * th
    zbuf = np.full(w * h, np.inf, np.float32)
    fbuf = np.full(w * h, -1, np.int64)
    ibig = np.iinfo(np.int64).max
    area = (u1 - u0 + 1).astype(np.int64) * (v1 - v0 + 1)
    cum = np.cumsum(area)
    start = 0
    while start < len(faces):
        base = cum[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(cum, base + chunk, side="right")))
        towner, tl = _ragged(ntiles[start:stop])
        towner += start
        ty, tx = tl // tw[towner], tl % tw[towner]
        c0 = u0[towner] + tx * TILE
        c1 = np.minimum(c0 + TILE - 1, u1[towner])
        r0 = v0[towner] + ty * TILE
        r1 = np.minimum(r0 + TILE - 1, v1[towner])
        dx0, dx1, dy0, dy1 = ux[c0], ux[c1], vy[r0], vy[r1]
        cf = coef[towner]
        pos_ok = np.ones(len(towner), bool)
        neg_ok = np.ones(len(towner), bool)
        for k in range(3):
            a_, b_, c_ = cf[:, 3 * k], cf[:, 3 * k + 1], cf[:, 3 * k + 2]
            ax0, ax1, by0, by1 = a_ * dx0, a_ * dx1, b_ * dy0, b_ * dy1
            pos_ok &= c_ + np.maximum(ax0, ax1) + np.maximum(by0, by1) >= 0
            neg_ok &= c_ + np.minimum(ax0, ax1) + np.minimum(by0, by1) <= 0
        kt = np.flatnonzero(pos_ok | neg_ok)
        tww = (c1 - c0 + 1)[kt]
        owner_t, local = _ragged(tww * (r1 - r0 + 1)[kt])
        owner = towner[kt][owner_t]
        row = r0[kt][owner_t] + local // tww[owner_t]
        col = c0[kt][owner_t] + local % tww[owner_t]
        dx, dy = ux[col], vy[row]
        cf = coef[owner]
        s0 = cf[:, 0] * dx + cf[:, 1] * dy + cf[:, 2]
        s1 = cf[:, 3] * dx + cf[:, 4] * dy + cf[:, 5]
        s2 = cf[:, 6] * dx + cf[:, 7] * dy + cf[:, 8]
        inside = ((s0 >= 0) & (s1 >= 0) & (s2 >= 0)) | ((s0 <= 0) & (s1 <= 0) & (s2 <= 0))
        with np.errstate(divide="ignore", invalid="ignore"):
            depth = cf[:, 12] / (cf[:, 9] * dx + cf[:, 10] * dy + cf[:, 11])
        hit = np.flatnonzero(inside & (depth > NEAR) & (depth < FAR))
        pix = row[hit] * w + col[hit]
        depth, fidx = depth[hit], faces[owner[hit]]
        np.minimum.at(zbuf, pix, depth)
        win = depth <= zbuf[pix]
        pw, fw_ = pix[win], fidx[win]
        # Nearer hits from earlier chunks are overwritten; exact-depth ties (shared edges) go to the lowest index.
        tie = np.full(w * h, ibig, np.int64)
        np.minimum.at(tie, pw, fw_)
        upd = np.flatnonzero(tie != ibig)
        fbuf[upd] = tie[upd]
        start = stop
    zbuf[fbuf < 0] = 0.0
    return fbuf, zbuf


def shade(scene: Scene, camera: Camera, face: np.ndarray, depth: np.ndarray, normals_world: np.ndarray,
          lights: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 RGB in [0, 1] of the hit pixels, shaded with `shading.shade_np` (the one shading model)
    from each face's PBR material and world normal at the back-projected hit point; 0 where nothing is hit."""
    w, h = camera.width, camera.height
    hit = np.flatnonzero(face >= 0)
    out = np.zeros((w * h, 3), np.float32)
    if not len(hit):
        return out.reshape(h, w, 3)
    R, t = camera.pose[:3, :3].astype(np.float32), camera.pose[:3, 3].astype(np.float32)
    d = ray_directions(camera.K, w, h).astype(np.float32)[hit] * depth[hit, None]
    pos = mat3(d, R.T) + t
    fh = face[hit]
    mat = scene.face_material[fh]
    out[hit] = shade_np(pos, normals_world[fh], mat[:, :3], mat[:, 3], mat[:, 4], t, lights)
    return out.reshape(h, w, 3)


def scene_lights(scene: Scene) -> np.ndarray:
    """Ceiling lights (x, y, z, intensity): one near the room centre, more in large rooms."""
    lo, hi = scene.bounds()
    top = scene.meta.get("room_height", hi[2]) - 0.45
    if scene.floor_polygon is not None:
        poly = scene.floor_polygon
        cands = [poly.mean(axis=0)]
        # L-shaped rooms: also the centres of the two arms (the mean may sit in the cut corner).
        if len(poly) > 4:
            span = poly.max(axis=0) - poly.min(axis=0)
            grid = poly.min(axis=0) + np.stack(np.meshgrid([0.25, 0.75], [0.25, 0.75]), -1).reshape(-1, 2) * span
            cands += list(grid)
        pts = [c for c in cands if point_in_polygon(np.asarray(c)[None], poly)[0]]
    else:
        pts = [(lo[:2] + hi[:2]) / 2]
    pts = pts[:3] or [(lo[:2] + hi[:2]) / 2]
    return np.array([[p[0], p[1], top, 1.6 / math.sqrt(len(pts))] for p in pts], np.float64)


def render(scene: Scene, camera: Camera, normals_world: np.ndarray | None = None,
           lights: np.ndarray | None = None) -> RenderOutput:
    normals_world = scene.face_normals() if normals_world is None else normals_world
    face, depth = raycast(scene.triangles, camera, cull_backfaces=bool(scene.meta.get("oriented", False)))
    hit = face >= 0
    h, w = camera.height, camera.width
    R = camera.pose[:3, :3]
    nw = np.zeros((w * h, 3), np.float32)
    nw[hit] = normals_world[face[hit]]
    ncam = mat3(nw, R)  # world → camera frame
    # Flip to face the camera (rays point along +z in the camera frame, so a visible normal has n·d < 0).
    dirs = ray_directions(camera.K, w, h)
    flip = (ncam * dirs).sum(axis=1) > 0
    ncam[flip] *= -1
    sem = np.zeros(w * h, np.uint8)
    inst = np.zeros(w * h, np.int32)
    sem[hit] = scene.face_class[face[hit]]
    inst[hit] = scene.face_instance[face[hit]]
    rgb = shade(scene, camera, face, depth, normals_world, scene_lights(scene) if lights is None else lights)
    return RenderOutput(
        rgb=(rgb * 255 + 0.5).astype(np.uint8), depth=depth.reshape(h, w).astype(np.float32),
        normal=ncam.reshape(h, w, 3).astype(np.float32), semantic=sem.reshape(h, w), instance=inst.reshape(h, w),
        face=face.reshape(h, w),
    )


# ---------------------------------------------------------------------------------------------- cameras
def place_cameras(scene: Scene, rng: np.random.Generator, count: int, size: int,
                  fov_range: tuple[float, float] = (60.0, 80.0)) -> list[Camera]:
    """Cameras inside the room at eye height, each looking at a different piece of content."""
    lo, hi = scene.bounds()
    height = float(scene.meta.get("room_height", hi[2] - lo[2]))
    poly = scene.floor_polygon
    if poly is None:
        return orbit_cameras(scene, rng, count, size, fov_range)
    furniture = [o for o in scene.objects if o.label not in ("picture",)]
    targets = [o.center for o in furniture] or [np.array([*poly.mean(axis=0), height / 2])]
    cams: list[Camera] = []
    order = rng.permutation(len(targets))
    plo, phi = poly.min(axis=0), poly.max(axis=0)
    for i in range(count):
        target = np.array(targets[int(order[i % len(order)])], np.float64)
        if len(furniture) < count and i >= len(furniture):
            target = np.array([*rng.uniform(plo, phi), rng.uniform(0.4, 1.2)])
        best, best_score = None, -1.0
        fov = rng.uniform(*fov_range)
        for _ in range(64):
            xy = rng.uniform(plo + 0.3, phi - 0.3)
            if not _clear_spot(xy, poly, furniture, scene):
                continue
            dist = float(np.linalg.norm(xy - target[:2]))
            if dist < 1.2 or _blocked(xy, target[:2], poly):
                continue
            # Keep walls out of the foreground: free space along the view centre and both frustum edges.
            fwd = (target[:2] - xy) / dist
            half = math.radians(fov) / 2 * 0.8
            side = min(_ray_to_walls(xy, _rotate(fwd, a), poly) for a in (-half, half))
            ahead = _ray_to_walls(xy, fwd, poly)
            if side < 0.9:
                continue
            score = min(ahead, 6.0) + min(side, 3.0) + rng.uniform(0, 1.0)
            if score > best_score:
                eye = np.array([xy[0], xy[1], rng.uniform(1.2, min(1.8, height - 0.3))])
                best, best_score = eye, score
        if best is None:
            best = _fallback_eye(rng, poly, height)
        look = target.copy()
        look[2] = min(look[2], best[2] - 0.3)
        cams.append(Camera(intrinsics(size, size, fov), look_at(best, look), size, size))
    return cams


def _rotate(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _ray_to_walls(origin: np.ndarray, direction: np.ndarray, poly: np.ndarray) -> float:
    """Distance along a 2D ray to the first polygon edge."""
    a, b = poly, np.roll(poly, -1, axis=0)
    e = b - a
    denom = direction[0] * e[:, 1] - direction[1] * e[:, 0]
    w = a - origin
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (w[:, 0] * e[:, 1] - w[:, 1] * e[:, 0]) / denom
        s = (w[:, 0] * direction[1] - w[:, 1] * direction[0]) / denom
    ok = (np.abs(denom) > 1e-12) & (t > 1e-9) & (s >= 0) & (s <= 1)
    return float(t[ok].min()) if ok.any() else float("inf")


def _blocked(p: np.ndarray, q: np.ndarray, poly: np.ndarray) -> bool:
    """Does the segment p→q cross a wall (the reflex corner of an L-shaped room)?"""
    d = q - p
    length = float(np.linalg.norm(d))
    return _ray_to_walls(p, d / length, poly) < length


def _fallback_eye(rng: np.random.Generator, poly: np.ndarray, height: float) -> np.ndarray:
    lo, hi = poly.min(axis=0), poly.max(axis=0)
    for _ in range(200):
        xy = rng.uniform(lo, hi)
        if point_in_polygon(xy[None], poly)[0]:
            return np.array([xy[0], xy[1], min(1.5, height - 0.3)])
    return np.array([*poly[0], min(1.5, height - 0.3)])


def _clear_spot(xy: np.ndarray, poly: np.ndarray, objects: list, scene: Scene) -> bool:
    if not point_in_polygon(xy[None], poly)[0]:
        return False
    # At least 0.35 m from every wall.
    a, b = poly, np.roll(poly, -1, axis=0)
    ab = b - a
    s = np.clip(((xy - a) * ab).sum(axis=1) / (ab * ab).sum(axis=1), 0, 1)
    if np.min(np.linalg.norm(a + ab * s[:, None] - xy, axis=1)) < 0.35:
        return False
    for o in objects:
        c, sn = math.cos(o.yaw), math.sin(o.yaw)
        d = xy - o.center[:2]
        lx, ly = c * d[0] + sn * d[1], -sn * d[0] + c * d[1]
        if abs(lx) < o.size[0] / 2 + 0.25 and abs(ly) < o.size[1] / 2 + 0.25:
            return False
    return True


def orbit_cameras(scene: Scene, rng: np.random.Generator, count: int, size: int,
                  fov_range: tuple[float, float] = (45.0, 60.0)) -> list[Camera]:
    """Outside-in cameras on a ring around the scene (imported objects with no room)."""
    lo, hi = scene.bounds()
    centre = (lo + hi) / 2
    radius = float(np.linalg.norm(hi - lo)) / 2
    cams = []
    for i in range(count):
        az = 2 * math.pi * (i + rng.uniform(-0.2, 0.2)) / count
        el = math.radians(rng.uniform(15, 40))
        fov = rng.uniform(*fov_range)
        dist = radius / math.sin(math.radians(fov) / 2) * 1.05
        eye = centre + dist * np.array([math.cos(az) * math.cos(el), math.sin(az) * math.cos(el), math.sin(el)])
        cams.append(Camera(intrinsics(size, size, fov), look_at(eye, centre), size, size))
    return cams


def scale_camera(camera: Camera, width: int, height: int) -> Camera:
    """The same camera rendered at another image size (intrinsics scaled)."""
    sx, sy = width / camera.width, height / camera.height
    K = camera.K.copy()
    K[0] *= sx
    K[1] *= sy
    return Camera(K, camera.pose.copy(), width, height)
