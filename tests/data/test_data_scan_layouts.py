"""scan_layouts.py: procedural rooms written in ScanNet's and HM3D's on-disk layouts import back through the real
importers as the same room: geometry, classes, instances, colours, and (ScanNet) the captured frames at the
written poses through the two cameras' own intrinsics, with the depth imperfections asked for."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from interiorfusion_data.config import SimulateSection
from interiorfusion_data.importers import HM3DImporter, ScanNetImporter, map_label
from interiorfusion_data.pipeline import scene_cameras
from interiorfusion_data.procedural import ProceduralOptions, generate_scene, room_polygon_area
from interiorfusion_data.render import render
from interiorfusion_data.scan_layouts import (
    axis_alignment,
    raw_label,
    scan_poses,
    scannet_sensor,
    simulate_scans,
    write_hm3d_scene,
    write_scannet_scan,
)
from interiorfusion_data.scene import CLASSES, Scene

SMALL = ProceduralOptions(size_range=(3.0, 4.0), max_objects=6)


@pytest.fixture(scope="module")
def room() -> Scene:
    return generate_scene(4, 1, SMALL)


def face_parts(scene: Scene) -> Counter:
    """Faces per (instance, class): the same multiset whatever order an importer puts the faces in."""
    return Counter(zip(scene.face_instance.tolist(), (CLASSES[c] for c in scene.face_class.tolist()), strict=True))


def test_raw_labels_map_back_to_their_classes() -> None:
    for cls in CLASSES:
        if cls not in ("void", "unknown"):
            assert map_label(raw_label(cls)) == cls, (cls, raw_label(cls))


def test_scannet_sensor_keeps_the_fields_of_view() -> None:
    for which, full in (("color", (1296, 968)), ("depth", (640, 480))):
        big, small = scannet_sensor(which, *full), scannet_sensor(which, full[0] // 8, full[1] // 8)
        fov = lambda s: 2 * np.degrees(np.arctan(s.width / 2 / s.K[0, 0]))  # noqa: E731
        assert abs(fov(big) - fov(small)) < 1e-6 and 55 < fov(big) < 62
        assert np.allclose(small.K[:2, 2] + 0.5, (big.K[:2, 2] + 0.5) / 8)


def test_scannet_layout_imports_back_as_the_room(room: Scene, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    poses: list[np.ndarray | None] = list(scan_poses(room, rng, 5))
    poses.insert(2, None)  # tracking lost on frame 2
    align = axis_alignment(rng)
    color, depth = scannet_sensor("color", 162, 121), scannet_sensor("depth", 80, 60)
    out = write_scannet_scan(room, tmp_path, "scene0007_00", poses, color=color, depth=depth, align=align,
                             depth_noise=0.003, depth_dropout=0.05, rng=rng)
    assert {p.name for p in out.iterdir()} == {
        "color", "depth", "pose", "intrinsic", "scene0007_00_vh_clean_2.ply", "scene0007_00.txt",
        "scene0007_00_vh_clean_2.0.010000.segs.json", "scene0007_00.aggregation.json"}
    assert sorted(p.name for p in (out / "intrinsic").iterdir()) == [
        "extrinsic_color.txt", "extrinsic_depth.txt", "intrinsic_color.txt", "intrinsic_depth.txt"]
    assert len(list((out / "color").glob("*.jpg"))) == len(list((out / "depth").glob("*.png"))) == 6
    txt = (out / "scene0007_00.txt").read_text()
    assert "colorWidth = 162" in txt and "depthHeight = 60" in txt and "sceneType = " in txt
    # The mesh is stored in the raw scan frame: only the axis alignment brings it back.
    agg = json.loads((out / "scene0007_00.aggregation.json").read_text())
    assert agg["segmentsFile"] == "scannet.scene0007_00_vh_clean_2.0.010000.segs.json"
    assert len({s for g in agg["segGroups"] for s in g["segments"]}) > len(agg["segGroups"])  # over-segmented

    imp = ScanNetImporter(tmp_path, views=3, image_size=48)
    (item,) = imp.items()
    scene = imp.load(item)
    assert face_parts(scene) == face_parts(room)  # classes and instance ids, face for face
    for a, b in zip(scene.bounds(), room.bounds(), strict=True):
        assert np.allclose(a, b, atol=1e-5)
    by_inst = lambda s: {i: s.face_material[s.face_instance == i, :3].mean(0) for i in np.unique(s.face_instance)}  # noqa: E731
    ours, theirs = by_inst(scene), by_inst(room)
    assert all(np.allclose(ours[i], theirs[i], atol=1 / 255) for i in theirs)
    # A scan has no layout: its doors and windows come back as object boxes.
    assert Counter(o.label for o in scene.objects) == Counter(
        [o.label for o in room.objects] + ["door"] * len(room.doors) + ["window"] * len(room.windows))
    # The chosen frames: valid ones, at the written poses, their depth the room's seen through the colour camera.
    chosen = [int(i) for i in scene.meta["frames"].split()]
    assert len(chosen) == 3 and 2 not in chosen
    for cam, i, (rgb, z) in zip(scene.cameras, chosen, scene.frames, strict=True):
        assert np.allclose(cam.pose, poses[i], atol=1e-6)
        ref = render(room, cam)
        both = (z > 0) & (ref.depth > 0)
        assert 0.85 < both.mean() < 0.99  # ~5% holes
        # Noise of std 0.003·z²: |error| / z² has the median 0.6745 · 0.003 of a half-normal.
        rel = np.abs(z[both] - ref.depth[both]) / ref.depth[both] ** 2
        assert 0.0014 < np.median(rel) < 0.003, np.median(rel)
        assert np.abs(rgb.astype(float) - ref.rgb.astype(float)).mean() < 25


def test_hm3d_layout_imports_back_as_the_room(room: Scene, tmp_path: Path) -> None:
    out = write_hm3d_scene(room, tmp_path, "00042-abcdefghijk")
    assert sorted(p.name for p in out.iterdir()) == [
        "abcdefghijk.basis.glb", "abcdefghijk.semantic.glb", "abcdefghijk.semantic.txt"]
    imp = HM3DImporter(tmp_path)
    (item,) = imp.items()
    scene = imp.load(item)
    assert face_parts(scene) == face_parts(room)
    assert scene.instance_class() == room.instance_class()
    for a, b in zip(scene.bounds(), room.bounds(), strict=True):
        assert np.allclose(a, b, atol=1e-5)  # y-up files, z-up scene
    # The floor outline comes back from the floor faces: views are placed inside the room.
    assert scene.floor_polygon is not None
    assert abs(room_polygon_area(scene.floor_polygon) - room_polygon_area(room.floor_polygon)) < 1e-3
    from interiorfusion_data.config import DataStageConfig

    cfg = DataStageConfig.model_validate({"source": "hm3d", "importer": {"path": str(tmp_path)},
                                          "render": {"views": 2, "image_size": 32}})
    for cam in scene_cameras(scene, cfg, np.random.default_rng(0)):
        assert (render(scene, cam).depth > 0).mean() > 0.99


def test_simulated_scans_are_deterministic(tmp_path: Path) -> None:
    sim = SimulateSection(num_scenes=1, seed=3, frames=2, color_size=(64, 48), depth_size=(40, 30),
                          depth_noise=0.01, depth_dropout=0.1)
    trees = []
    for run in ("a", "b"):
        out = simulate_scans("scannet", tmp_path / run, sim, SMALL)
        trees.append({p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()})
    assert trees[0] == trees[1] and "scene0000_00/depth/1.png" in trees[0]
    hm3d = simulate_scans("hm3d", tmp_path / "h", SimulateSection(num_scenes=2), SMALL)
    assert len(HM3DImporter(hm3d).items()) == 2
    with pytest.raises(ValueError, match="no scan layout for source 'meshes'"):
        simulate_scans("meshes", tmp_path / "m", sim, SMALL)
