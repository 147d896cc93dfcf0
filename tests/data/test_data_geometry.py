"""Geometry checks: the voxeliser, the renderer and the procedural generator against ground truth."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from interiorfusion_data.primitives import box
from interiorfusion_data.procedural import generate_scene
from interiorfusion_data.render import intrinsics, look_at, render
from interiorfusion_data.scene import CLASS_ID, Camera, Material, SceneBuilder, obb_overlap, point_in_polygon
from interiorfusion_data.voxelize import (
    dequantize_attrs,
    downsample,
    fit_cube,
    quantize_attrs,
    scene_face_attrs,
    voxelize,
)


def tri_box_overlap(tris: np.ndarray, centres: np.ndarray, half: float) -> np.ndarray:
    """Brute-force separating-axis test (all 13 axes) of every triangle (T, 3, 3) against every cube centred
    at centres (P, 3): (P, T) bool."""
    v = tris[None] - centres[:, None, None]  # (P, T, 3, 3)
    e = [v[:, :, 1] - v[:, :, 0], v[:, :, 2] - v[:, :, 1], v[:, :, 0] - v[:, :, 2]]
    axes = [np.broadcast_to(np.eye(3)[j], e[0].shape) for j in range(3)]
    axes += [np.cross(ei, np.eye(3)[j]) for ei in e for j in range(3)] + [np.cross(e[0], e[1])]
    ok = np.ones(v.shape[:2], bool)
    for a in axes:
        p = (v * a[:, :, None]).sum(-1)
        r = half * np.abs(a).sum(-1)
        ok &= ~((p.min(-1) > r + 1e-9) | (p.max(-1) < -r - 1e-9))
    return ok


def test_voxelizer_matches_brute_force_triangle_box_overlap() -> None:
    rng = np.random.default_rng(0)
    n = 12
    for _ in range(20):
        tri = rng.uniform(0, n, (3, 3))
        grid = voxelize(tri[None], np.zeros((1, 8)), n, np.zeros(3), 1.0)
        got = set(map(tuple, grid.coords.tolist()))
        cubes = np.array(list(itertools.product(range(n), repeat=3)))
        expected = set(map(tuple, cubes[tri_box_overlap(tri[None], cubes + 0.5, 0.5)[:, 0]].tolist()))
        assert got == expected


def test_voxels_lie_on_the_generating_surfaces_and_cover_them() -> None:
    scene = generate_scene(3, 1)
    lo, hi = scene.bounds()
    origin, side = fit_cube(lo, hi)
    n = 64
    h = side / n
    grid = voxelize(scene.triangles, scene_face_attrs(scene.face_material, scene.face_normals()), n, origin, h)
    assert len(grid) > 1000 and grid.coords.max() < n
    # Every voxel's cube touches one of the scene's triangles (so its centre is within h·√3/2 of the surface).
    rng = np.random.default_rng(0)
    centres = grid.centers()[rng.choice(len(grid), 200, replace=False)]
    touched = np.zeros(len(centres), bool)
    for chunk in np.array_split(np.arange(len(scene.faces)), 8):
        touched |= tri_box_overlap(scene.triangles[chunk], centres, h / 2 * (1 + 1e-6)).any(axis=1)
    assert touched.all()
    # Every surface point falls in an occupied voxel.
    f = rng.integers(len(scene.faces), size=5000)
    a, b = rng.random((2, 5000, 1))
    flip = (a + b) > 1
    a, b = np.where(flip, 1 - a, a), np.where(flip, 1 - b, b)
    tri = scene.triangles[f]
    pts = tri[:, 0] + a * (tri[:, 1] - tri[:, 0]) + b * (tri[:, 2] - tri[:, 0])
    idx = np.floor((pts - origin) / h).astype(np.int64)
    occupied = set(map(tuple, grid.coords.astype(np.int64).tolist()))
    assert all(tuple(i) in occupied for i in idx.tolist())


def test_voxel_material_and_normal_come_from_the_owning_surface() -> None:
    sb = SceneBuilder("two-boxes")
    red, blue = Material((0.9, 0.1, 0.1), 0.0, 0.5), Material((0.1, 0.2, 0.9), 1.0, 0.2)
    v, f = box((0.5, 0.5, 0.5), (0.6, 0.6, 0.6))
    sb.add(v, f, "cabinet", sb.new_instance(), red)
    v, f = box((1.5, 0.5, 0.5), (0.6, 0.6, 0.6))
    sb.add(v, f, "table", sb.new_instance(), blue)
    scene = sb.build()
    grid = voxelize(scene.triangles, scene_face_attrs(scene.face_material, scene.face_normals()), 32,
                    np.array([0.0, 0.0, 0.0]), 2.0 / 32)
    centres = grid.centers()
    left = centres[:, 0] < 1.0
    assert np.allclose(grid.attrs[left, :5], [0.9, 0.1, 0.1, 0.0, 0.5])
    assert np.allclose(grid.attrs[~left, :5], [0.1, 0.2, 0.9, 1.0, 0.2])
    # Top-face voxels (away from edges) carry the +z normal.
    top = (np.abs(centres[:, 2] - 0.8) < 2.0 / 32 * 0.5) & (np.abs(centres[:, 0] - 0.5) < 0.2) & (
        np.abs(centres[:, 1] - 0.5) < 0.2)
    assert top.sum() > 10 and np.allclose(grid.attrs[top, 5:8], [0, 0, 1])
    q = dequantize_attrs(quantize_attrs(grid.attrs))
    assert np.abs(q - grid.attrs).max() <= 1 / 127.5


def test_downsampling_is_exact() -> None:
    scene = generate_scene(5, 2)
    lo, hi = scene.bounds()
    origin, side = fit_cube(lo, hi)
    attrs = scene_face_attrs(scene.face_material, scene.face_normals())
    fine = voxelize(scene.triangles, attrs, 128, origin, side / 128)
    coarse = voxelize(scene.triangles, attrs, 32, origin, side / 32)
    c, a = downsample(fine.coords, fine.attrs, 4)
    # Parent occupied iff any child is: the same set as voxelising at the coarse level directly.
    assert np.array_equal(c.astype(np.int64), coarse.coords.astype(np.int64))
    # Attributes are the mean of the children (normals re-normalised).
    parent = fine.coords.astype(np.int64) // 4
    k = 7
    kids = (parent == c[k].astype(np.int64)).all(axis=1)
    assert np.allclose(a[k, :5], fine.attrs[kids, :5].mean(axis=0), atol=1e-5)
    n = fine.attrs[kids, 5:8].mean(axis=0)
    assert np.allclose(a[k, 5:8], n / np.linalg.norm(n), atol=1e-5)


def ray_box(origin: np.ndarray, d: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[float, float]:
    """Slab test: (t_enter, t_exit) along origin + t d, or (inf, -inf) when missed."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (lo - origin) / d, (hi - origin) / d
    tmin, tmax = np.nanmax(np.minimum(t1, t2)), np.nanmin(np.maximum(t1, t2))
    return (tmin, tmax) if tmax >= max(tmin, 0) else (math.inf, -math.inf)


def test_render_depth_and_semantics_match_analytic_ray_box_hits() -> None:
    sb = SceneBuilder("known")
    room_lo, room_hi = np.array([0.0, 0.0, 0.0]), np.array([4.0, 3.0, 2.5])
    v, f = box((room_lo + room_hi) / 2, room_hi - room_lo)
    sb.add(v, f[:, ::-1], "wall", sb.new_instance(), Material((0.8, 0.8, 0.8)))  # inward-facing shell
    obj_lo, obj_hi = np.array([2.5, 1.0, 0.0]), np.array([3.3, 2.0, 0.9])
    v, f = box((obj_lo + obj_hi) / 2, obj_hi - obj_lo)
    inst = sb.new_instance()
    sb.add(v, f, "cabinet", inst, Material((0.6, 0.3, 0.2)))
    scene = sb.build()
    eye = np.array([0.6, 0.7, 1.5])
    cam = Camera(intrinsics(48, 40, 75.0), look_at(eye, np.array([2.9, 1.5, 0.5])), 48, 40)
    out = render(scene, cam)
    R = cam.pose[:3, :3]
    hits_obj = 0
    for v_ in range(cam.height):
        for u_ in range(cam.width):
            dcam = np.array([(u_ + 0.5 - cam.K[0, 2]) / cam.K[0, 0], (v_ + 0.5 - cam.K[1, 2]) / cam.K[1, 1], 1.0])
            d = R @ dcam
            t_obj, _ = ray_box(eye, d, obj_lo, obj_hi)
            _, t_room = ray_box(eye, d, room_lo, room_hi)  # exit of the room box from inside
            t, label, ins = (t_obj, "cabinet", inst) if t_obj < t_room else (t_room, "wall", 1)
            # z-depth = distance along the optical axis (d's camera z component is 1).
            assert out.depth[v_, u_] == pytest.approx(t, abs=1e-4)
            assert out.semantic[v_, u_] == CLASS_ID[label]
            assert out.instance[v_, u_] == ins
            hits_obj += label == "cabinet"
    assert hits_obj > 50
    # Normals face the camera, unit length, in the camera frame.
    n = out.normal.reshape(-1, 3)
    assert np.allclose(np.linalg.norm(n, axis=1), 1, atol=1e-5)


def test_render_empty_view_is_void() -> None:
    sb = SceneBuilder("tiny")
    v, f = box((0, 0, 0), (0.1, 0.1, 0.1))
    sb.add(v, f, "plant", 1, Material((0.2, 0.6, 0.2)))
    cam = Camera(intrinsics(16, 16, 60.0), look_at(np.array([5.0, 0, 0]), np.array([10.0, 0, 0])), 16, 16)
    out = render(sb.build(), cam)
    assert (out.depth == 0).all() and (out.semantic == 0).all() and (out.rgb == 0).all()


@pytest.fixture(scope="module")
def scenes() -> list:
    return [generate_scene(11, i) for i in range(24)]


def test_rooms_have_structure_and_many_furniture_classes(scenes: list) -> None:
    kinds = {s.meta["room_type"] for s in scenes}
    assert kinds == {"rect", "lshape"}
    labels = {o.label for s in scenes for o in s.objects}
    assert len(labels) >= 10, labels
    for s in scenes:
        present = set(np.unique(s.face_class).tolist())
        assert {CLASS_ID["wall"], CLASS_ID["floor"], CLASS_ID["ceiling"]} <= present
        assert len(s.walls) == len(s.floor_polygon) and s.doors
        # Distinct scenes.
    assert len({round(float(s.vertices.sum()), 6) for s in scenes}) == len(scenes)


def test_boxes_match_the_generated_furniture(scenes: list) -> None:
    for s in scenes:
        for o in s.objects:
            v = s.vertices[np.unique(s.faces[s.face_instance == o.instance])]
            c, sn = math.cos(o.yaw), math.sin(o.yaw)
            d = v - o.center
            local = np.stack([c * d[:, 0] + sn * d[:, 1], -sn * d[:, 0] + c * d[:, 1], d[:, 2]], axis=1)
            # Tight: the instance's vertices span exactly the box.
            assert np.allclose(local.min(axis=0), -o.size / 2, atol=1e-6), (s.name, o.label)
            assert np.allclose(local.max(axis=0), o.size / 2, atol=1e-6), (s.name, o.label)
            assert (s.face_class[s.face_instance == o.instance] == CLASS_ID[o.label]).all()


def test_no_furniture_interpenetrates_or_leaves_the_room(scenes: list) -> None:
    for s in scenes:
        objs = s.objects
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                assert not obb_overlap(a, b, eps=1e-6), (s.name, a.label, b.label)
            corners = a.corners2d()
            centre = corners.mean(axis=0)
            assert point_in_polygon(centre + (corners - centre) * 0.999, s.floor_polygon).all(), (s.name, a.label)
            assert a.center[2] - a.size[2] / 2 >= -1e-9
            assert a.center[2] + a.size[2] / 2 <= s.meta["room_height"]
        # Nor the doors and windows.
        for op in [*s.doors, *s.windows]:
            op_faces = s.face_instance == op.instance
            assert op_faces.any()


def test_same_seed_same_scene_other_seed_other_scene() -> None:
    a, b, c = generate_scene(7, 3), generate_scene(7, 3), generate_scene(8, 3)
    assert np.array_equal(a.vertices, b.vertices) and np.array_equal(a.face_material, b.face_material)
    assert not (a.vertices.shape == c.vertices.shape and np.array_equal(a.vertices, c.vertices))
