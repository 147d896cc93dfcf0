"""Importers on small files written here in each source's own layout: mesh folder, ScanNet, 3D-FRONT."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import trimesh

from interiorfusion_core.errors import UserError
from interiorfusion_core.storage import LocalStore
from interiorfusion_data.config import DataStageConfig
from interiorfusion_data.importers import Front3DImporter, MeshFolderImporter, ScanNetImporter, map_label
from interiorfusion_data.loader import open_dataset
from interiorfusion_data.pipeline import build_sample, write_dataset
from interiorfusion_data.scene import CLASS_ID


def colored_box(extents: tuple[float, float, float], center: tuple[float, float, float],
                rgb: tuple[int, int, int]) -> trimesh.Trimesh:
    m = trimesh.creation.box(extents=extents)
    m.apply_translation(center)
    m.visual.face_colors = np.tile([*rgb, 255], (len(m.faces), 1))
    return m


def test_label_mapping() -> None:
    assert map_label("office chair") == "chair" and map_label("Three-Seat / Multi-seat Sofa") == "sofa"
    assert map_label("bookshelf") == "shelf" and map_label("nightstand") == "nightstand"
    assert map_label("kitchen cabinets") == "cabinet" and map_label("toaster") == "other"


def test_mesh_folder(tmp_path: Path) -> None:
    colored_box((0.5, 0.5, 0.9), (0, 0, 0.45), (200, 30, 30)).export(tmp_path / "chair_01.ply")
    room = tmp_path / "room_a"
    room.mkdir()
    colored_box((1.2, 0.8, 0.75), (0, 0, 0.375), (120, 80, 40)).export(room / "table_1.ply")
    colored_box((0.3, 0.3, 1.5), (1.5, 0, 0.75), (250, 240, 200)).export(room / "lamp_2.glb")
    imp = MeshFolderImporter(tmp_path)
    items = imp.items()
    assert [p.name for p in items] == ["chair_01.ply", "room_a"]
    chair = imp.load(items[0])
    assert (chair.face_class == CLASS_ID["chair"]).all()
    assert np.allclose(chair.face_material[:, :3], [200 / 255, 30 / 255, 30 / 255], atol=1e-3)
    assert len(chair.objects) == 1 and np.allclose(chair.objects[0].size, [0.5, 0.5, 0.9])
    multi = imp.load(items[1])
    assert {o.label for o in multi.objects} == {"table", "lamp"}
    lamp = next(o for o in multi.objects if o.label == "lamp")
    assert np.allclose(lamp.center, [1.5, 0, 0.75], atol=1e-6)
    cfg = DataStageConfig.model_validate({"source": "meshes", "importer": {"path": str(tmp_path)},
                                          "voxel": {"resolutions": [32]}, "render": {"views": 2, "image_size": 32}})
    sample = build_sample(multi, cfg, 0)
    assert "view1.semantic.png" in sample.members and sample.stats["voxels_32"] > 50


def test_mesh_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no mesh files"):
        MeshFolderImporter(tmp_path).items()
    (tmp_path / "broken.ply").write_text("ply\nthis is not a mesh\n")
    imp = MeshFolderImporter(tmp_path)
    with pytest.raises(UserError, match=r"broken\.ply"):
        imp.load(imp.items()[0])


def write_scannet(root: Path) -> Path:
    scene = root / "scene0000_00"
    (scene / "pose").mkdir(parents=True)
    (scene / "intrinsic").mkdir()
    floor = trimesh.Trimesh([[0, 0, 0], [4, 0, 0], [4, 3, 0], [0, 3, 0]], [[0, 1, 2], [0, 2, 3]], process=False)
    chair = trimesh.creation.box(extents=(0.5, 0.5, 0.9))
    chair.apply_translation((2.0, 1.5, 0.45))
    mesh = trimesh.util.concatenate([floor, chair])
    colors = np.zeros((len(mesh.vertices), 4), np.uint8)
    colors[:4] = (150, 150, 150, 255)
    colors[4:] = (20, 40, 200, 255)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=colors)
    mesh.export(scene / "scene0000_00_vh_clean_2.ply")
    segs = [10] * 4 + [11] * 8
    (scene / "scene0000_00_vh_clean_2.0.010000.segs.json").write_text(json.dumps({"segIndices": segs}))
    (scene / "scene0000_00.aggregation.json").write_text(json.dumps({"segGroups": [
        {"id": 0, "objectId": 0, "label": "floor", "segments": [10]},
        {"id": 1, "objectId": 1, "label": "office chair", "segments": [11]},
    ]}))
    (scene / "scene0000_00.txt").write_text(
        "axisAlignment = 1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1\ncolorHeight = 480\ncolorWidth = 640\n")
    K = np.array([[500.0, 0, 320, 0], [0, 500.0, 240, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    np.savetxt(scene / "intrinsic" / "intrinsic_color.txt", K)
    from interiorfusion_data.render import look_at

    for i, eye in enumerate([(0.5, 0.5, 1.5), (3.5, 2.5, 1.5)]):
        np.savetxt(scene / "pose" / f"{i}.txt", look_at(np.array(eye), np.array([2.0, 1.5, 0.45])))
    return scene


def test_scannet_scene(tmp_path: Path) -> None:
    write_scannet(tmp_path)
    imp = ScanNetImporter(tmp_path, views=2, image_size=48)
    (item,) = imp.items()
    scene = imp.load(item)
    assert set(np.unique(scene.face_class).tolist()) == {CLASS_ID["floor"], CLASS_ID["chair"]}
    assert len(set(scene.face_instance.tolist())) == 2
    (box,) = scene.objects
    assert box.label == "chair" and np.allclose(box.center, [2.0, 1.5, 0.45]) and np.allclose(box.size,
                                                                                              [0.5, 0.5, 0.9])
    chair_faces = scene.face_class == CLASS_ID["chair"]
    assert np.allclose(scene.face_material[chair_faces, :3], [20 / 255, 40 / 255, 200 / 255], atol=1e-3)
    assert scene.cameras is not None and len(scene.cameras) == 2
    cam = scene.cameras[0]
    # Intrinsics scaled to the square render (height 480 → 48) and centre-cropped.
    assert cam.width == 48 and cam.K[0, 0] == pytest.approx(50.0) and cam.K[0, 2] == pytest.approx(24.0)
    from interiorfusion_data.render import render

    out = render(scene, cam)
    assert out.semantic[24, 24] == CLASS_ID["chair"]  # the pose looks at the chair


def write_front3d(root: Path) -> None:
    model = root / "3D-FUTURE-model" / "model-a"
    model.mkdir(parents=True)
    # A chair model in its y-up frame: 0.5 wide (x), 0.9 tall (y), 0.4 deep (z), standing on y = 0.
    m = trimesh.creation.box(extents=(0.5, 0.9, 0.4))
    m.apply_translation((0, 0.45, 0))
    m.export(model / "raw_model.obj")

    def quad(uid: str, kind: str, pts: list[list[float]]) -> dict:
        return {"uid": uid, "type": kind, "xyz": [c for p in pts for c in p], "faces": [0, 1, 2, 0, 2, 3],
                "material": "mat-1"}

    w, d, h = 4.0, 3.0, 2.6  # y-up: floor is x-z plane
    meshes = [quad("floor", "Floor", [[0, 0, 0], [0, 0, d], [w, 0, d], [w, 0, 0]]),
              quad("ceil", "Ceiling", [[0, h, 0], [w, h, 0], [w, h, d], [0, h, d]])]
    corners = [[0, 0], [w, 0], [w, d], [0, d]]
    for i in range(4):
        (x0, z0), (x1, z1) = corners[i], corners[(i + 1) % 4]
        meshes.append(quad(f"wall{i}", "WallInner", [[x0, 0, z0], [x1, 0, z1], [x1, h, z1], [x0, h, z0]]))
    meshes.append(quad("door", "Door", [[1.0, 0, 0.01], [1.9, 0, 0.01], [1.9, 2.0, 0.01], [1.0, 2.0, 0.01]]))
    yaw = math.pi / 2
    house = {
        "uid": "house-1",
        "mesh": meshes,
        "material": [{"uid": "mat-1", "color": [230, 220, 200, 255]}],
        "furniture": [{"uid": "f1", "jid": "model-a", "category": "Dining Chair"}],
        "scene": {"room": [{"type": "DiningRoom", "instanceid": "DiningRoom-1", "children": [
            *({"ref": mm["uid"], "pos": [0, 0, 0], "rot": [0, 0, 0, 1], "scale": [1, 1, 1]} for mm in meshes),
            {"ref": "f1", "pos": [2.0, 0, 1.5], "rot": [0, math.sin(yaw / 2), 0, math.cos(yaw / 2)],
             "scale": [1, 1, 1]},
        ]}]},
    }
    (root / "house-1.json").write_text(json.dumps(house))


def test_front3d_house(tmp_path: Path) -> None:
    write_front3d(tmp_path)
    imp = Front3DImporter(tmp_path)
    (item,) = imp.items()
    scene = imp.load(item)
    present = set(np.unique(scene.face_class).tolist())
    assert {CLASS_ID[c] for c in ("floor", "ceiling", "wall", "door", "chair")} == present
    # z-up metres: the floor at z = 0, the ceiling at 2.6.
    assert scene.vertices[:, 2].min() == pytest.approx(0) and scene.vertices[:, 2].max() == pytest.approx(2.6)
    (chair,) = scene.objects
    assert chair.label == "chair"
    # Placed at x = 2, y-up z = 1.5 → z-up y = -1.5; turned 90° about the up axis.
    assert np.allclose(chair.center, [2.0, -1.5, 0.45], atol=1e-6)
    assert np.allclose(chair.size, [0.5, 0.4, 0.9], atol=1e-6)
    # R_y(+90°) turns local x to -z (y-up), which is +y in z-up: yaw +90°.
    assert abs(math.remainder(chair.yaw - math.pi / 2, 2 * math.pi)) < 1e-6
    v = scene.vertices[np.unique(scene.faces[scene.face_instance == chair.instance])]
    assert np.allclose(v.min(axis=0), chair.center - [0.2, 0.25, 0.45], atol=1e-6)
    assert len(scene.walls) == 4 and all(w.height == pytest.approx(2.6) for w in scene.walls)
    assert len(scene.doors) == 1 and scene.doors[0].width == pytest.approx(0.9, abs=0.02)
    assert scene.floor_polygon is not None and len(scene.floor_polygon) == 4
    # A dataset from it, cameras inside the room.
    cfg = DataStageConfig.model_validate({"source": "front3d", "importer": {"path": str(tmp_path)},
                                          "voxel": {"resolutions": [32]}, "render": {"views": 2, "image_size": 32},
                                          "splits": {"train": 1.0, "val": 0.0, "test": 0.0}, "preview_samples": 0})
    write_dataset(LocalStore(tmp_path / "out"), cfg, tmp_path)
    s = open_dataset(tmp_path / "out", "train", require_manifest=False).get(0)
    assert (s["depth"] > 0).all() and (s["depth"] < 5.1).all()
    assert s["layout_text"].count("Wall(") == 4 and "Door(wall_" in s["layout_text"]
