"""Per-voxel labels: the class table, the majority rule and its tie-break, downsampling, format versions 1 and 2,
the importers' label paths and the preview's class view."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import trimesh

from interiorfusion_core.storage import LocalStore
from interiorfusion_data import classes
from interiorfusion_data.config import DataStageConfig
from interiorfusion_data.format import SAMPLE_FORMAT, decode_sample, json_bytes
from interiorfusion_data.importers import Front3DImporter, MeshFolderImporter, ScanNetImporter
from interiorfusion_data.loader import SceneLoader, open_dataset
from interiorfusion_data.pipeline import build_sample, write_dataset
from interiorfusion_data.preview import PALETTE, contact_sheet
from interiorfusion_data.primitives import box
from interiorfusion_data.procedural import BUILDERS, LABEL, generate_scene
from interiorfusion_data.scene import CLASS_ID, CLASSES, STRUCTURE_CLASSES, UNKNOWN, Material, SceneBuilder
from interiorfusion_data.shards import ShardWriter, iter_tar_samples
from interiorfusion_data.voxelize import (
    downsample_labeled,
    fit_cube,
    majority,
    scene_face_attrs,
    triangle_box_area,
    voxelize,
)

CFG = {"num_scenes": 3, "voxel": {"resolutions": [32, 64]}, "render": {"views": 1, "image_size": 16},
       "splits": {"train": 1.0, "val": 0.0, "test": 0.0}, "preview_samples": 0}


# ---------------------------------------------------------------------------------------------- class table
def test_class_table_is_complete_and_consistent() -> None:
    for table in (classes.NYU40, classes.ADE20K, classes.SCANNET18):
        assert list(table) == list(CLASSES)
    generated = {LABEL.get(k, k) for k in BUILDERS} | set(STRUCTURE_CLASSES)
    for seed in range(4):
        generated |= {CLASSES[c] for c in np.unique(generate_scene(seed, 0).face_class)}
    for name in generated:
        assert 1 <= classes.NYU40[name] <= 40 and 1 <= classes.ADE20K[name] <= 150, name
    # ScanNet-18 is exactly the NYU40 ids of the benchmark, each reached by one project class.
    assert len(classes.SCANNET18_NYU40) == len(classes.SCANNET18_NAMES) == 18
    reached = [v for v in classes.SCANNET18.values() if v is not None]
    assert sorted(reached) == list(range(18))
    for name, idx in classes.SCANNET18.items():
        if idx is not None:
            assert classes.SCANNET18_NYU40[idx] == classes.NYU40[name]
    # Names agree where the project name is a label-set name.
    for name in ("wall", "floor", "ceiling", "door", "bed", "chair", "sofa", "table", "desk", "cabinet", "lamp",
                 "picture", "counter", "curtain", "refrigerator", "toilet", "sink", "bathtub"):
        assert classes.NYU40_NAMES[classes.NYU40[name]] == name
    assert classes.NYU40["window"] == 9 and classes.NYU40["shelf"] == 10 and classes.NYU40["tv"] == 25
    assert classes.NYU40_NAMES[28] == "shower curtain" and classes.NYU40["shower_curtain"] == 28
    for name, idx in classes.ADE20K.items():
        assert idx == 0 or idx in classes.ADE20K_NAMES, name
    assert classes.ADE20K_NAMES[classes.ADE20K["wall"]] == "wall" and classes.ADE20K["floor"] == 4
    assert classes.ade20k_train_id("wall") == 0 and classes.ade20k_train_id("unknown") is None
    assert classes.NYU40["void"] == classes.NYU40["unknown"] == 0 and classes.SCANNET18["unknown"] is None
    assert len(classes.NYU40_BY_ID) == len(CLASSES) and len(PALETTE) == len(CLASSES)
    assert CLASSES[:20][-1] == "other" and CLASSES[-1] == "unknown"  # version-1 ids are unchanged


# ---------------------------------------------------------------------------------------------- majority rule
def test_triangle_area_inside_the_unit_cube_is_exact() -> None:
    rng = np.random.default_rng(1)
    tris = rng.uniform(-0.8, 1.8, (6, 3, 3))
    got = triangle_box_area(tris)
    for tri, area in zip(tris, got, strict=True):
        u = rng.random((200_000, 2))
        flip = u.sum(1) > 1
        u[flip] = 1 - u[flip]
        pts = tri[0] + u[:, :1] * (tri[1] - tri[0]) + u[:, 1:] * (tri[2] - tri[0])
        full = 0.5 * np.linalg.norm(np.cross(tri[1] - tri[0], tri[2] - tri[0]))
        assert area == pytest.approx(full * ((pts >= 0) & (pts <= 1)).all(1).mean(), abs=0.01)
    flat = np.array([[[-1, -1, 0.5], [3, -1, 0.5], [-1, 3, 0.5]], [[0, 0, 1.0], [1, 0, 1.0], [0, 1, 1.0]],
                     [[2, 2, 2], [3, 2, 2], [2, 3, 2]]], float)
    assert np.allclose(triangle_box_area(flat), [1.0, 0.5, 0.0])  # closed cube: a face on its boundary counts


def test_majority_weights_then_lowest_ids() -> None:
    g, c, i = majority(np.array([0, 0, 0, 1, 1, 2, 2, 2]), np.array([3, 2, 3, 5, 4, 6, 6, 6]),
                       np.array([1, 9, 2, 0, 0, 4, 3, 4]), np.array([1, 2, 1, 1, 1, 1, 1, 1]))
    # group 0: class 3 (1 + 1) ties class 2 (2) → class 2; group 1: tie → class 4; group 2: instance 4 has 2.
    assert g.tolist() == [0, 1, 2] and c.tolist() == [2, 4, 6] and i.tolist() == [9, 0, 4]


def two_part_scene() -> tuple:
    """A 4 m floor quad (z = 0.25) and a chair box standing on it, the box's bottom coplanar with the floor."""
    sb = SceneBuilder("t")
    floor = np.array([[0, 0, 0.25], [4, 0, 0.25], [4, 4, 0.25], [0, 4, 0.25]], float)
    sb.add(floor, np.array([[0, 1, 2], [0, 2, 3]]), "floor", sb.new_instance(), Material((0.5, 0.5, 0.5)))
    v, f = box((1.5, 1.5, 0.25 + 0.75), (1.0, 1.0, 1.5))  # centre, size: x, y in [1, 2], z in [0.25, 1.75]
    sb.add(v, f, "chair", sb.new_instance(), Material((0.9, 0.1, 0.1)))
    return sb.build()


def test_voxel_labels_follow_the_area_majority_with_lowest_class_ties() -> None:
    scene = two_part_scene()
    n, h = 16, 0.25
    g = voxelize(scene.triangles, scene_face_attrs(scene.face_material, scene.face_normals()), n, np.zeros(3), h,
                 face_class=scene.face_class, face_instance=scene.face_instance)
    assert g.labels.dtype == np.int16 and g.instances.dtype == np.int32 and len(g.labels) == len(g)
    lab = {tuple(c): (int(a), int(b)) for c, a, b in zip(g.coords.tolist(), g.labels, g.instances, strict=True)}
    floor, chair = (CLASS_ID["floor"], 1), (CLASS_ID["chair"], 2)
    # The floor plane z = 0.25 lies on a voxel boundary; the voxeliser puts it in the layer above.
    assert lab[(0, 0, 1)] == floor
    # Under the chair's middle, floor and chair bottom cover the same area: the tie goes to the lower class id.
    assert lab[(5, 5, 1)] == floor and lab[(6, 6, 1)] == floor
    # Along the chair's side, its vertical wall adds area: the chair wins its bottom voxels.
    assert lab[(4, 5, 1)] == chair
    # Higher up only the chair touches.
    assert lab[(4, 5, 4)] == chair and lab[(8, 6, 3)] == chair and lab[(6, 6, 7)] == chair
    # Without labels the voxeliser is unchanged.
    plain = voxelize(scene.triangles, scene_face_attrs(scene.face_material, scene.face_normals()), n, np.zeros(3), h)
    assert plain.labels is None and np.array_equal(plain.coords, g.coords) and np.array_equal(plain.attrs, g.attrs)


def test_procedural_voxel_labels_are_some_touching_triangle_and_consistent_instances() -> None:
    scene = generate_scene(2, 3)
    lo, hi = scene.bounds()
    origin, side = fit_cube(lo, hi)
    n = 48
    g = voxelize(scene.triangles, scene_face_attrs(scene.face_material, scene.face_normals()), n, origin, side / n,
                 face_class=scene.face_class, face_instance=scene.face_instance)
    inst_class = scene.instance_class()
    assert all(inst_class[i] == CLASSES[c] for c, i in zip(g.labels.tolist(), g.instances.tolist(), strict=True))
    assert set(np.unique(g.labels).tolist()) == set(np.unique(scene.face_class).tolist())
    assert (g.labels != UNKNOWN).all() and (g.instances > 0).all()


def brute_downsample_labels(coords: np.ndarray, labels: np.ndarray, inst: np.ndarray, f: int) -> dict:
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for c, a, b in zip((coords // f).tolist(), labels.tolist(), inst.tolist(), strict=True):
        groups.setdefault(tuple(c), []).append((a, b))
    out = {}
    for key, kids in groups.items():
        cls_count: dict[int, int] = {}
        for a, _ in kids:
            cls_count[a] = cls_count.get(a, 0) + 1
        best = min(cls_count, key=lambda a: (-cls_count[a], a))
        inst_count: dict[int, int] = {}
        for a, b in kids:
            if a == best:
                inst_count[b] = inst_count.get(b, 0) + 1
        out[key] = (best, min(inst_count, key=lambda b: (-inst_count[b], b)))
    return out


def test_label_downsampling_is_the_children_majority() -> None:
    scene = generate_scene(4, 1)
    lo, hi = scene.bounds()
    origin, side = fit_cube(lo, hi)
    g = voxelize(scene.triangles, scene_face_attrs(scene.face_material, scene.face_normals()), 64, origin, side / 64,
                 face_class=scene.face_class, face_instance=scene.face_instance)
    c, _, lab, inst = downsample_labeled(g.coords, g.attrs, 4, g.labels, g.instances)
    expected = brute_downsample_labels(g.coords.astype(np.int64), g.labels, g.instances, 4)
    got = {tuple(k): (int(a), int(b)) for k, a, b in zip(c.tolist(), lab, inst, strict=True)}
    assert got == expected and lab.dtype == np.int16
    # Random labels exercise the ties.
    rng = np.random.default_rng(0)
    rl, ri = rng.integers(1, 4, len(g)).astype(np.int16), rng.integers(0, 3, len(g)).astype(np.int32)
    c, _, lab, inst = downsample_labeled(g.coords, g.attrs, 2, rl, ri)
    expected = brute_downsample_labels(g.coords.astype(np.int64), rl, ri, 2)
    assert {tuple(k): (int(a), int(b)) for k, a, b in zip(c.tolist(), lab, inst, strict=True)} == expected


# ---------------------------------------------------------------------------------------------- format
@pytest.fixture(scope="module")
def v2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("v2")
    write_dataset(LocalStore(root / "out"), DataStageConfig.model_validate(CFG), root)
    return root / "out"


def test_v2_samples_store_labels_at_every_level(v2_dir: Path) -> None:
    ds = open_dataset(v2_dir, "train", require_manifest=False)
    members = ds.members(0)
    assert {"occ32.labels.npy", "occ32.instances.npy", "occ64.labels.npy", "occ64.instances.npy"} <= set(members)
    s = ds.get(0, resolution=64)
    assert s["meta"]["format"] == SAMPLE_FORMAT == "interiorfusion.scene/2"
    assert s["present"] == {"voxel_labels": True, "voxel_instances": True, "lights": True}
    assert s["labels"].dtype == np.int16 and s["instances"].dtype == np.int32
    assert s["labels"].shape == s["instances"].shape == (len(s["coords"]),)
    # The stored coarse level is the majority downsampling of the finest; a level not stored (16) is that of the
    # nearest finer stored level (32).
    s32 = ds.get(0, resolution=32, fields=("voxels",))
    c, _, lab, inst = downsample_labeled(s["coords"], s["feats"], 2, s["labels"], s["instances"])
    assert np.array_equal(c, s32["coords"]) and np.array_equal(lab, s32["labels"])
    assert np.array_equal(inst, s32["instances"])
    s16 = ds.get(0, resolution=16, fields=("voxels",))
    c16, _, lab16, _ = downsample_labeled(s32["coords"], s32["feats"], 2, s32["labels"], s32["instances"])
    assert np.array_equal(c16, s16["coords"]) and np.array_equal(lab16, s16["labels"])
    batch = next(iter(SceneLoader(ds, 2, resolution=32, fields=("voxels",), shuffle=False)))
    assert batch["labels"].shape == batch["instances"].shape == (len(batch["coords"]),)
    assert batch["has_labels"].tolist() == [True, True]


def write_v1_copy(src: Path, dest: Path) -> None:
    """The same dataset as interiorfusion.scene/1 wrote it: no label members, no `present`, no lights, 20 classes."""
    info = json.loads((src / "dataset.json").read_text())
    info["classes"] = list(CLASSES[:20])
    for entry in info["splits"]["train"]["shards"]:
        samples = list(iter_tar_samples((src / entry["shard"]).read_bytes()))
        (dest / "train").mkdir(parents=True, exist_ok=True)
        writer = ShardWriter(dest / entry["shard"], Path(entry["shard"]).name)
        from interiorfusion_data.format import EncodedSample

        for key, members in samples:
            meta = json.loads(members["meta.json"])
            meta["format"] = "interiorfusion.scene/1"
            meta.pop("present")
            meta.pop("lights")
            kept = {k: v for k, v in members.items() if not k.endswith((".labels.npy", ".instances.npy"))}
            kept["meta.json"] = json_bytes(meta)
            writer.add(EncodedSample(key, kept))
        idx = writer.close()
        (dest / entry["index"]).write_bytes(json_bytes(idx))
        entry["size"], entry["sha256"] = idx["size"], idx["sha256"]
    (dest / "dataset.json").write_bytes(json_bytes(info))


def test_loader_reads_version_1_shards_and_counts_missing_labels(v2_dir: Path, tmp_path: Path) -> None:
    write_v1_copy(v2_dir, tmp_path / "v1")
    ds = open_dataset(tmp_path / "v1", "train", require_manifest=False)
    assert "occ64.labels.npy" not in ds.members(0) and ds.classes == list(CLASSES)
    s = ds.get(0, resolution=32)
    assert s["meta"]["format"] == "interiorfusion.scene/1" and s["present"]["voxel_labels"] is False
    assert (s["labels"] == UNKNOWN).all() and (s["instances"] == 0).all() and len(s["coords"]) > 0
    v2 = open_dataset(v2_dir, "train", require_manifest=False).get(0, resolution=32)
    assert np.array_equal(s["coords"], v2["coords"]) and np.array_equal(s["feats"], v2["feats"])
    loader = SceneLoader(ds, 2, resolution=32, fields=("voxels",), shuffle=False)
    batches = list(loader)
    assert sum(len(b["keys"]) for b in batches) == 3 and not any(b["has_labels"].any() for b in batches)
    metrics = loader.metrics()
    assert metrics["data/samples_without_labels"] == 3 and metrics["data/corrupt_samples"] == 0
    assert metrics["data/samples_without_lights"] == 3 and not any(b["has_lights"].any() for b in batches)
    assert s["present"]["lights"] is False and s["lights"].shape == (0, 4)
    # An unknown format version is a corrupt sample with a sentence, not a crash.
    members = dict(ds.members(0))
    members["meta.json"] = json_bytes({**json.loads(members["meta.json"]), "format": "interiorfusion.scene/9"})
    with pytest.raises(ValueError, match="interiorfusion.scene/9"):
        decode_sample(members)


# ---------------------------------------------------------------------------------------------- importers
def write_scannet_layout(root: Path) -> Path:
    """A tiny scan in ScanNet's on-disk layout: floor (objectId 3, 'floor'), a chair (objectId 7, 'office
    chair'), an unannotated box, and the decoy full-mesh aggregation that belongs to another segments file."""
    scene = root / "scans" / "scene0042_01"
    scene.mkdir(parents=True)
    floor = trimesh.Trimesh([[0, 0, 0], [4, 0, 0], [4, 3, 0], [0, 3, 0]], [[0, 1, 2], [0, 2, 3]], process=False)
    chair = trimesh.creation.box(extents=(0.5, 0.5, 0.9))
    chair.apply_translation((2.0, 1.5, 0.45))
    clutter = trimesh.creation.box(extents=(0.3, 0.3, 0.3))
    clutter.apply_translation((0.6, 0.6, 0.15))
    mesh = trimesh.util.concatenate([floor, chair, clutter])
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=np.full((len(mesh.vertices), 4), 200, np.uint8))
    mesh.export(scene / "scene0042_01_vh_clean_2.ply")
    segs = [5] * 4 + [17] * 4 + [18] * 4 + [30] * 8
    (scene / "scene0042_01_vh_clean_2.0.010000.segs.json").write_text(json.dumps(
        {"params": {"kThresh": "0.0001", "segMinVerts": "20"}, "sceneId": "scene0042_01", "segIndices": segs}))
    (scene / "scene0042_01.aggregation.json").write_text(json.dumps({
        "sceneId": "scannet.scene0042_01", "appId": "Aggregator.v2",
        "segmentsFile": "scannet.scene0042_01_vh_clean_2.0.010000.segs.json",
        "segGroups": [
            {"id": 3, "objectId": 3, "label": "floor", "segments": [5]},
            {"id": 7, "objectId": 7, "label": "office chair", "segments": [17, 18]},
        ]}))
    (scene / "scene0042_01_vh_clean.aggregation.json").write_text(json.dumps({
        "sceneId": "scannet.scene0042_01", "segmentsFile": "scannet.scene0042_01_vh_clean.segs.json",
        "segGroups": [{"id": 0, "objectId": 0, "label": "toilet", "segments": [5, 17, 18, 30]}]}))
    return scene


def test_scannet_layout_gives_voxel_labels_and_instances(tmp_path: Path) -> None:
    write_scannet_layout(tmp_path)
    imp = ScanNetImporter(tmp_path, views=0)
    (item,) = imp.items()
    scene = imp.load(item)
    assert set(np.unique(scene.face_class).tolist()) == {CLASS_ID["floor"], CLASS_ID["chair"], UNKNOWN}
    # Instances are objectId + 1; the unannotated box has none.
    assert scene.instance_class() == {4: "floor", 8: "chair"}
    (box_,) = scene.objects
    assert box_.instance == 8 and box_.label == "chair"
    cfg = DataStageConfig.model_validate({"source": "scannet", "importer": {"path": str(tmp_path)},
                                          "voxel": {"resolutions": [32, 64]}, "render": {"views": 0}})
    sample = build_sample(scene, cfg, 0)
    s = decode_sample(sample.members, resolution=64)
    # A scan without frames: views are renders; it has no layout polygon and no PBR materials.
    assert s["present"] == {"voxel_labels": True, "voxel_instances": True, "lights": True,
                            "captured_frames": False, "materials": False, "layout": False}
    centres = s["origin"] + (s["coords"] + 0.5) * s["voxel_size"]
    up = centres[:, 2] > 0.6
    chair_top = up & (np.abs(centres[:, 0] - 2.0) < 0.2) & (np.abs(centres[:, 1] - 1.5) < 0.2)
    assert chair_top.sum() > 3 and (s["labels"][chair_top] == CLASS_ID["chair"]).all()
    assert (s["instances"][chair_top] == 8).all()
    clutter = (np.abs(centres[:, 2] - 0.3) < 0.03) & (np.abs(centres[:, 0] - 0.6) < 0.1)
    clutter &= np.abs(centres[:, 1] - 0.6) < 0.1
    assert clutter.sum() > 0 and (s["labels"][clutter] == UNKNOWN).all() and (s["instances"][clutter] == 0).all()
    far_floor = (centres[:, 2] < 0.1) & (centres[:, 0] > 3.0)
    assert (s["labels"][far_floor] == CLASS_ID["floor"]).all() and (s["instances"][far_floor] == 4).all()


def test_scannet_without_annotation_files_says_labels_are_absent(tmp_path: Path) -> None:
    scene_dir = write_scannet_layout(tmp_path)
    for f in scene_dir.glob("*.aggregation.json"):
        f.unlink()
    scene = ScanNetImporter(tmp_path, views=0).load(scene_dir)
    assert (scene.face_class == UNKNOWN).all() and (scene.face_instance == 0).all() and not scene.objects
    cfg = DataStageConfig.model_validate({"source": "scannet", "importer": {"path": str(tmp_path)},
                                          "voxel": {"resolutions": [32]}, "render": {"views": 0}})
    s = decode_sample(build_sample(scene, cfg, 0).members)
    assert s["present"] == {"voxel_labels": False, "voxel_instances": False, "lights": True,
                            "captured_frames": False, "materials": False, "layout": False}
    assert (s["labels"] == UNKNOWN).all()


def test_mesh_folder_without_names_is_unknown(tmp_path: Path) -> None:
    m = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    m.export(tmp_path / "scan_0001.ply")
    m.export(tmp_path / "chair_7.ply")
    imp = MeshFolderImporter(tmp_path)
    cfg = DataStageConfig.model_validate({"source": "meshes", "importer": {"path": str(tmp_path)},
                                          "voxel": {"resolutions": [32]}, "render": {"views": 0}})
    named, unnamed = (imp.load(p) for p in imp.items())
    s = decode_sample(build_sample(unnamed, cfg, 0).members)
    assert s["present"]["voxel_labels"] is False and (s["labels"] == UNKNOWN).all() and (s["instances"] == 0).all()
    assert not unnamed.objects
    s = decode_sample(build_sample(named, cfg, 0).members)
    assert s["present"]["voxel_labels"] is True and (s["labels"] == CLASS_ID["chair"]).all()
    assert (s["instances"] == 1).all()


def test_front3d_category_from_model_info(tmp_path: Path) -> None:
    model = tmp_path / "3D-FUTURE-model" / "jid-1"
    model.mkdir(parents=True)
    trimesh.creation.box(extents=(0.5, 0.5, 0.5)).export(model / "raw_model.obj")
    (tmp_path / "3D-FUTURE-model" / "model_info.json").write_text(json.dumps(
        [{"model_id": "jid-1", "super-category": "Cabinet/Shelf/Desk", "category": "Nightstand"}]))
    floor = {"uid": "fl", "type": "Floor", "xyz": [0, 0, 0, 0, 0, 2, 2, 0, 2, 2, 0, 0], "faces": [0, 1, 2, 0, 2, 3]}
    house = {"mesh": [floor], "furniture": [{"uid": "f", "jid": "jid-1"}],
             "scene": {"room": [{"type": "Bedroom", "children": [{"ref": "fl"}, {"ref": "f", "pos": [1, 0.25, 1]}]}]}}
    (tmp_path / "h.json").write_text(json.dumps(house))
    imp = Front3DImporter(tmp_path)
    scene = imp.load(imp.items()[0])
    assert {CLASSES[c] for c in np.unique(scene.face_class)} == {"floor", "nightstand"}
    cfg = DataStageConfig.model_validate({"source": "front3d", "importer": {"path": str(tmp_path)},
                                          "voxel": {"resolutions": [32]}, "render": {"views": 0}})
    s = decode_sample(build_sample(scene, cfg, 0).members)
    assert set(np.unique(s["labels"]).tolist()) == {CLASS_ID["floor"], CLASS_ID["nightstand"]}
    assert s["present"]["voxel_labels"] is True


# ---------------------------------------------------------------------------------------------- preview
def test_preview_has_a_voxel_class_panel(v2_dir: Path) -> None:
    ds = open_dataset(v2_dir, "train", require_manifest=False)
    s = ds.get(0, resolution=32)
    sheet = np.asarray(contact_sheet([s], tile=64))
    assert sheet.shape[1] == 6 * 64
    panel = sheet[18:, 5 * 64:].reshape(-1, 3)
    wall = PALETTE[CLASS_ID["wall"]].astype(int)
    # Shaded palette colours: some pixels are a darkened wall colour (same hue ratios), none are white only.
    lit = panel[(panel != 255).any(axis=1)]
    assert len(lit) > 500
    ratio = lit.astype(float) / np.maximum(wall, 1)
    assert (np.ptp(ratio, axis=1) < 0.03).sum() > 100
