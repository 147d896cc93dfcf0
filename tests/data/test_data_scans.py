"""Real scans: a ScanNet scene written in ScanNet's extracted layout (mesh, labels, colour/depth/pose frames
rendered from the mesh by the project's renderer at known poses, one invalid pose; scan_layouts.py writes it)
imports end to end into shards whose views are the captured frames, and the VAE trains on them; so does an HM3D
scene in habitat's layout.

The room is a hand-made box room with a chair, so every expectation here (poses, bounds, labels, colours) is
stated independently of the writer and the importer. Frame sizes are small (colour 162×121, depth 80×60, each
with its own intrinsics) to keep the test fast; the file names, formats and the separate colour/depth cameras are
ScanNet's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trimesh
import yaml

from interiorfusion_data.config import DataStageConfig
from interiorfusion_data.importers import ScanNetImporter, backproject
from interiorfusion_data.loader import collate_scenes, open_dataset
from interiorfusion_data.render import look_at, render
from interiorfusion_data.scan_layouts import SensorCamera, write_hm3d_scene, write_scannet_scan
from interiorfusion_data.scene import CLASS_ID, Scene, SceneBuilder

ROOM = (4.0, 3.0, 2.5)
CHAIR = ((2.8, 1.5, 0.45), (0.5, 0.5, 0.9))
# Camera-to-world (aligned frame): eye, target. Frame 1 nearly repeats frame 0; frame 3's pose is invalid; frame 6
# is a close-up of a wall patch (covers little).
POSES = {0: ((1.0, 1.5, 1.4), (4.0, 1.5, 1.0)), 1: ((1.05, 1.5, 1.4), (4.0, 1.55, 1.0)),
         2: ((3.0, 1.5, 1.4), (0.0, 1.5, 1.0)), 4: ((2.0, 0.4, 1.4), (2.0, 3.0, 1.0)),
         5: ((2.0, 2.6, 1.4), (2.0, 0.0, 1.0)), 6: ((1.0, 2.7, 1.2), (1.0, 3.0, 1.2))}
COLOR = (162, 121, np.array([[140.0, 0, 81.0], [0, 140.0, 60.5], [0, 0, 1]]))
DEPTH = (80, 60, np.array([[72.0, 0, 41.0], [0, 72.0, 29.0], [0, 0, 1]]))
# ScanNet's axisAlignment maps the raw scan frame to the aligned one: here a yaw of 30° and a shift.
_c, _s = np.cos(np.radians(30)), np.sin(np.radians(30))
ALIGN = np.array([[_c, -_s, 0, 0.7], [_s, _c, 0, -0.4], [0, 0, 1, 0.1], [0, 0, 0, 1]])


def room_parts() -> list[tuple[str, np.ndarray, np.ndarray, tuple[int, int, int]]]:
    """(label, vertices, faces, colour) of the room's six sides (one quad each) and a chair box, aligned frame."""
    x, y, z = ROOM
    quads = {"floor": [(0, 0, 0), (x, 0, 0), (x, y, 0), (0, y, 0)],
             "ceiling": [(0, 0, z), (x, 0, z), (x, y, z), (0, y, z)],
             "wall": [[(0, 0, 0), (x, 0, 0), (x, 0, z), (0, 0, z)], [(0, y, 0), (x, y, 0), (x, y, z), (0, y, z)],
                      [(0, 0, 0), (0, y, 0), (0, y, z), (0, 0, z)], [(x, 0, 0), (x, y, 0), (x, y, z), (x, 0, z)]]}
    quad_faces = np.array([[0, 1, 2], [0, 2, 3]])
    parts = [("floor", np.array(quads["floor"], float), quad_faces, (150, 120, 90)),
             ("ceiling", np.array(quads["ceiling"], float), quad_faces, (230, 230, 230))]
    for i, q in enumerate(quads["wall"]):
        parts.append(("wall", np.array(q, float), quad_faces, (200 - 30 * i, 180, 120 + 30 * i)))
    chair = trimesh.creation.box(extents=CHAIR[1])
    chair.apply_translation(CHAIR[0])
    parts.append(("chair", np.asarray(chair.vertices), np.asarray(chair.faces), (20, 40, 200)))
    return parts


def truth_scene() -> Scene:
    """The room as a Scene: part k is instance k + 1."""
    sb = SceneBuilder("truth")
    for k, (label, v, f, rgb) in enumerate(room_parts()):
        sb.add(v, f, label, k + 1, np.tile([*(np.array(rgb) / 255), 0.0, 0.8], (len(f), 1)))
    return sb.build()


def write_test_scan(root: Path, name: str = "scene0000_00") -> Path:
    """The room as a ScanNet scan: frames 0–6 at POSES (frame 3's pose lost), stored in the raw frame of ALIGN."""
    poses = [look_at(np.array(POSES[i][0]), np.array(POSES[i][1])) if i in POSES else None for i in range(7)]
    return write_scannet_scan(truth_scene(), root, name, poses, color=SensorCamera(*COLOR),
                              depth=SensorCamera(*DEPTH), align=ALIGN)


@pytest.fixture(scope="module")
def scan_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scannet")
    write_test_scan(root)
    return root


def test_scannet_frames_are_the_covering_valid_views(scan_root: Path) -> None:
    imp = ScanNetImporter(scan_root, views=3, image_size=32)
    scene = imp.load(imp.items()[0])
    chosen = [int(i) for i in scene.meta["frames"].split()]
    assert len(chosen) == 3 and len(scene.cameras) == 3 and len(scene.frames) == 3
    assert 3 not in chosen  # the invalid pose
    assert not {0, 1} <= set(chosen)  # never both of two frames that see the same wall
    assert 6 not in chosen  # nor the close-up while frames covering whole walls are left
    assert scene.present == {"captured_frames": True, "materials": False, "layout": False}
    # The axis alignment is applied to poses like to the mesh: the aligned poses are the ones rendered from.
    for cam, i in zip(scene.cameras, chosen, strict=True):
        assert np.allclose(cam.pose, look_at(np.array(POSES[i][0]), np.array(POSES[i][1])), atol=1e-6)
    lo, hi = scene.bounds()
    assert np.allclose(lo, [0, 0, 0], atol=1e-6) and np.allclose(hi, ROOM, atol=1e-6)
    # More views than valid frames: every valid frame once, still never the invalid one.
    all_views = ScanNetImporter(scan_root, views=8, image_size=32).load(imp.items()[0])
    assert sorted(int(i) for i in all_views.meta["frames"].split()) == [0, 1, 2, 4, 5, 6]


def test_scannet_frame_cameras_match_the_mesh(scan_root: Path) -> None:
    imp = ScanNetImporter(scan_root, views=3, image_size=32)
    scene = imp.load(imp.items()[0])
    truth = truth_scene()
    for cam, (rgb, depth) in zip(scene.cameras, scene.frames, strict=True):
        ref = render(truth, cam)
        # Depth resampled through the depth intrinsics agrees with a render at the view's camera.
        both = (depth > 0) & (ref.depth > 0)
        assert both.mean() > 0.9
        assert np.median(np.abs(depth[both] - ref.depth[both])) < 0.03
        # Colour resized and cropped consistently with the scaled intrinsics.
        assert np.abs(rgb.astype(float) - ref.rgb.astype(float)).mean() < 25


def scannet_data_config(root: Path, **extra: object) -> dict:
    return {"kind": "data", "dataset": "InteriorFusion-Real", "source": "scannet", "importer": {"path": str(root)},
            "num_scenes": None, "voxel": {"resolutions": [32, 64]}, "render": {"views": 2, "image_size": 32},
            "splits": {"train": 0.34, "val": 0.33, "test": 0.33}, "shards": {"samples_per_shard": 1},
            "preview_samples": 1, **extra}


def test_scannet_scan_to_shards_and_vae(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from interiorfusion_core.contract import run_stage

    monkeypatch.setenv("INTERIORFUSION_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = tmp_path / "scans"
    for name in ("scene0000_00", "scene0001_00", "scene0002_00"):  # three scans: one per split
        write_test_scan(root, name)
    cfg_path = tmp_path / "data.yaml"
    cfg_path.write_text(yaml.safe_dump(scannet_data_config(root)))
    DataStageConfig.model_validate(yaml.safe_load(cfg_path.read_text()))
    data = run_stage("data", cfg_path, output=(tmp_path / "data").as_uri())
    ds = open_dataset(data.uri, "train")
    assert len(ds) == 1
    s = ds.get(0)
    assert s["present"] == {"voxel_labels": True, "voxel_instances": True, "lights": False,
                            "captured_frames": True, "materials": False, "layout": False}
    assert s["rgb"].shape == (2, 32, 32, 3) and len(s["meta"]["scene"]["frames"].split()) == 2
    # Back-projected depth of every view lands on the mesh's voxels (within one voxel at 64³).
    occ = set(map(tuple, s["coords"].tolist()))
    near = {(a + i, b + j, c + k) for a, b, c in occ for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)}
    for v in range(2):
        pts = backproject(s["depth"][v], s["intrinsics"][v].astype(np.float64), s["cam_to_world"][v].astype(np.float64))
        cells = np.floor((pts - s["origin"]) / s["voxel_size"]).astype(int)
        hit = np.mean([tuple(c) in near for c in cells.tolist()])
        assert hit > 0.99, f"view {v}: only {hit:.3f} of its back-projected depth is within a voxel of the mesh"
    batch = collate_scenes([s])
    assert not batch["has_materials"].any() and not batch["has_layout"].any() and batch["has_captured_frames"].all()
    assert set(np.unique(s["labels"]).tolist()) <= {CLASS_ID[c] for c in ("floor", "ceiling", "wall", "chair")}

    train_vae_briefly(data.uri, tmp_path)


def train_vae_briefly(data_uri: str, tmp_path: Path) -> None:
    from interiorfusion_core.contract import run_stage

    vae_cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/smoke/vae.yaml").read_text())
    vae_cfg["training"].update(max_steps=2, log_every=1, val_every=2, val_batches=1, checkpoint_every=2,
                               batch_size=1, curriculum=[{"resolution": 32, "steps": 1, "lr": 2e-3},
                                                         {"resolution": 64, "steps": 1, "lr": 1e-3}])
    vae_cfg["scheduler"]["warmup_steps"] = 1
    vae_cfg["encode"]["eval_samples"] = 1
    vae_cfg["data"]["dataset"] = "InteriorFusion-Real"
    vae_path = tmp_path / "vae.yaml"
    vae_path.write_text(yaml.safe_dump(vae_cfg))
    vae = run_stage("vae", vae_path, inputs={"data": data_uri}, output=(tmp_path / "vae").as_uri())
    m = vae.manifest.metrics
    # Trained both curriculum steps, with the render losses computed against the captured depth.
    assert m["steps"] == 2 and np.isfinite(m["loss"]) and m["depth_consistency"] > 0


# ---------------------------------------------------------------------------------------------- HM3D
def write_hm3d(root: Path, name: str = "00800-TEEsavR23oF") -> Path:
    """The room in habitat's HM3D layout: `SCENE/HASH.basis.glb`, `HASH.semantic.glb`, `HASH.semantic.txt`."""
    return write_hm3d_scene(truth_scene(), root, name)


def test_hm3d_scene_labels_and_inside_cameras(tmp_path: Path) -> None:
    from interiorfusion_data.importers import HM3DImporter
    from interiorfusion_data.pipeline import scene_cameras

    write_hm3d(tmp_path)
    imp = HM3DImporter(tmp_path)
    (item,) = imp.items()
    scene = imp.load(item)
    lo, hi = scene.bounds()
    assert np.allclose(lo, [0, 0, 0], atol=1e-5) and np.allclose(hi, ROOM, atol=1e-5)  # y-up → z-up
    assert scene.instance_class() == {k + 1: label for k, (label, *_) in enumerate(room_parts())}
    (box,) = scene.objects
    assert box.label == "chair" and np.allclose(box.center, CHAIR[0], atol=1e-5)
    assert scene.present == {"captured_frames": False, "materials": False, "layout": False}
    chair = scene.face_class == CLASS_ID["chair"]
    assert np.allclose(scene.face_material[chair, :3], np.array([20, 40, 200]) / 255, atol=1e-3)
    cfg = DataStageConfig.model_validate({"source": "hm3d", "importer": {"path": str(tmp_path)},
                                          "render": {"views": 3, "image_size": 32}})
    cams = scene_cameras(scene, cfg, np.random.default_rng(0))
    assert len(cams) == 3
    for cam in cams:  # inside the room, not orbiting it
        eye = cam.pose[:3, 3]
        assert (eye > 0).all() and (eye < np.array(ROOM)).all()
        assert (render(scene, cam).depth > 0).mean() > 0.99


def test_hm3d_scene_to_shards_and_vae(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from interiorfusion_core.contract import run_stage

    monkeypatch.setenv("INTERIORFUSION_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = tmp_path / "hm3d"
    for name in ("00800-TEEsavR23oF", "00801-HaxA7YrQdEC", "00802-wcojb4TFT35"):
        write_hm3d(root, name)
    cfg = scannet_data_config(root, source="hm3d")
    cfg_path = tmp_path / "data.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    data = run_stage("data", cfg_path, output=(tmp_path / "data").as_uri())
    s = open_dataset(data.uri, "train").get(0)
    assert s["present"] == {"voxel_labels": True, "voxel_instances": True, "lights": True,
                            "captured_frames": False, "materials": False, "layout": False}
    assert s["rgb"].shape == (2, 32, 32, 3) and (s["depth"] > 0).mean() > 0.99
    assert set(np.unique(s["labels"]).tolist()) == {CLASS_ID[c] for c in ("floor", "ceiling", "wall", "chair")}
    train_vae_briefly(data.uri, tmp_path)
