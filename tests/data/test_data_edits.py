"""Edit pairs: one object moved, removed or added, in the original's frame, cameras and lights; the voxels change
inside the pair's boxes only; dataset.json lists the pairs; a resumed run adopts the edit shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from interiorfusion_core.contract import run_stage
from interiorfusion_core.errors import ConfigError
from interiorfusion_data.config import DataStageConfig
from interiorfusion_data.edits import edit_rng, edit_scene, movable_objects, move_object, remove_object
from interiorfusion_data.loader import open_dataset
from interiorfusion_data.procedural import generate_scene
from interiorfusion_data.scene import obb_overlap, point_in_polygon

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke" / "data.yaml"
EDITS = ["num_scenes=6", "render.views=2", "render.image_size=32", "voxel.resolutions=[32, 64]",
         "preview_samples=0", "shards.samples_per_shard=2", "edits={per_scene: 1, splits: [train, val]}"]


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERIORFUSION_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_movable_objects_stand_on_the_floor_with_nothing_on_them() -> None:
    for index in range(6):
        scene = generate_scene(0, index)
        movable = movable_objects(scene)
        for obj in movable:
            assert obj.center[2] - obj.size[2] / 2 < 0.05
        resting = [o for o in scene.objects if o.center[2] - o.size[2] / 2 > 0.05]
        for top in resting:  # whatever rests on an object (a lamp on a nightstand) pins that object
            below = [o for o in scene.objects if o is not top
                     and abs(o.center[2] + o.size[2] / 2 - (top.center[2] - top.size[2] / 2)) < 0.05]
            assert not any(b in movable for b in below if np.linalg.norm(b.center[:2] - top.center[:2]) < 0.01)


def test_remove_drops_exactly_the_object_and_move_slides_only_it() -> None:
    scene = generate_scene(0, 3)
    obj = movable_objects(scene)[0]
    removed = remove_object(scene, obj)
    assert not (removed.face_instance == obj.instance).any()
    assert len(removed.faces) == len(scene.faces) - int((scene.face_instance == obj.instance).sum())
    assert obj not in removed.objects and len(removed.objects) == len(scene.objects) - 1
    np.testing.assert_array_equal(np.sort(removed.triangles.reshape(-1, 9), 0),
                                  np.sort(scene.triangles[scene.face_instance != obj.instance].reshape(-1, 9), 0))
    moved = move_object(scene, obj, edit_rng(0, 3, 0), (0.4, 1.2))
    assert moved is not None
    edited, box = moved
    mine = scene.face_instance == obj.instance
    delta = edited.triangles[mine] - scene.triangles[mine]
    shift = delta.reshape(-1, 3)[0]
    np.testing.assert_allclose(delta.reshape(-1, 3), np.broadcast_to(shift, (int(mine.sum()) * 3, 3)), atol=1e-12)
    assert shift[2] == 0 and 0.4 <= np.hypot(*shift[:2]) <= 1.2
    np.testing.assert_array_equal(edited.triangles[~mine], scene.triangles[~mine])
    assert not any(obb_overlap(box, o) for o in scene.objects if o is not obj)
    assert point_in_polygon(box.corners2d(), scene.floor_polygon).all()


def test_edit_scene_honours_the_kinds() -> None:
    scene = generate_scene(0, 5)
    kinds = {edit_scene(scene, edit_rng(0, 5, k), ("move",)).kind for k in range(4)}
    assert kinds == {"move"}
    assert {edit_scene(scene, edit_rng(0, 5, k), ("add",)).kind for k in range(4)} == {"remove"}
    edit = edit_scene(scene, edit_rng(0, 5, 0), ("remove",))
    assert [p["kind"] for p in edit.pairs("a", "b", ("remove",))] == ["remove"]
    assert [(p["before"], p["after"]) for p in edit.pairs("a", "b", ("remove", "add"))] == [("a", "b"), ("b", "a")]


def test_edits_config_is_checked_and_absent_by_default() -> None:
    cfg = DataStageConfig.model_validate({"num_scenes": 2})
    assert cfg.edits is None and "edits" not in cfg.model_dump(mode="json")  # old configs keep their digests
    with pytest.raises(ValueError, match="shift_m"):
        DataStageConfig.model_validate({"num_scenes": 2, "edits": {"shift_m": [1.0, 0.5]}})
    with pytest.raises(ValueError):
        DataStageConfig.model_validate({"num_scenes": 2, "edits": {"kinds": ["teleport"]}})


def _voxel_keys(sample: dict, n: int) -> set[tuple[int, int, int]]:
    assert sample["resolution"] == n
    return set(map(tuple, sample["coords"].tolist()))


def test_stage_writes_edit_pairs_that_change_only_inside_their_boxes(tmp_path: Path) -> None:
    out = tmp_path / "data"
    outcome = run_stage("data", SMOKE, overrides=EDITS, output=str(out))
    info = open_dataset(str(out), "train").info
    assert set(info["edits"]) == {"train", "val"}
    pairs = [(split, p) for split, e in info["edits"].items() for p in e["pairs"]]
    assert pairs and outcome.manifest.metrics["edit_pairs"] == len(pairs)
    opened = {s: open_dataset(str(out), s) for s in ("train", "val", "edits-train", "edits-val")}
    by_key = {ref.key: (s, i) for s, d in opened.items() for i, ref in enumerate(d.refs)}
    kinds = set()
    for split, pair in pairs:
        kinds.add(pair["kind"])
        (bs, bi), (as_, ai) = by_key[pair["before"]], by_key[pair["after"]]
        assert {bs, as_} == {split, f"edits-{split}"}
        before, after = opened[bs].get(bi, 64), opened[as_].get(ai, 64)
        edited = after if as_.startswith("edits-") else before
        assert edited["meta"]["edit"]["kind"] == ("remove" if pair["kind"] == "add" else pair["kind"])
        # One frame, the same cameras and lights: only the scene changed.
        assert before["meta"]["origin"] == after["meta"]["origin"]
        assert before["meta"]["cube_size"] == after["meta"]["cube_size"]
        np.testing.assert_array_equal(before["cam_to_world"], after["cam_to_world"])
        np.testing.assert_array_equal(before["intrinsics"], after["intrinsics"])
        np.testing.assert_array_equal(before["lights"], after["lights"])
        # The voxels change, and only where the object was or is (one voxel of slack for the surface's rounding).
        a, b = _voxel_keys(before, 64), _voxel_keys(after, 64)
        changed = np.array(sorted(a ^ b), np.float64)
        assert len(changed), pair
        centres = np.asarray(before["origin"], np.float64) + (changed + 0.5) * float(before["voxel_size"])
        slack = 1.5 * float(before["voxel_size"])
        boxes = np.asarray(pair["boxes"])
        inside = np.zeros(len(centres), bool)
        for lo, hi in boxes:
            inside |= ((centres >= lo - slack) & (centres <= hi + slack)).all(1)
        assert inside.all(), (pair, int((~inside).sum()), len(centres))
        # The condition views change too (the object shows, or is gone, in at least one view).
        assert not np.array_equal(before["depth"], after["depth"])
    assert kinds <= {"move", "remove", "add"} and "add" in kinds
    # Rerun: every shard, the edit shards included, is taken over as complete.
    again = run_stage("data", SMOKE, overrides=EDITS, output=str(out))
    assert again.skipped and again.manifest.digest == outcome.manifest.digest


def test_resumed_write_adopts_edit_shards(tmp_path: Path) -> None:
    from interiorfusion_core.config import load_config
    from interiorfusion_core.storage import open_store
    from interiorfusion_data.pipeline import write_dataset

    cfg = load_config(SMOKE, overrides=EDITS).model
    store = open_store(str(tmp_path / "out"))
    first = write_dataset(store, cfg, tmp_path)
    second = write_dataset(store, cfg, tmp_path, resumed=True)
    assert second.built == 0 and second.adopted == first.built
    assert second.dataset["edits"] == first.dataset["edits"]


def test_an_invalid_edits_entry_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="edits"):
        run_stage("data", SMOKE, overrides=[*EDITS[:-1], "edits={per_scene: 0}"], output=str(tmp_path / "d"))
