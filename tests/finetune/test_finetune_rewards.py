"""GRPO rewards (interiorfusion_finetune.rewards) on a box room with a cabinet: a triangle mesh (every plane a third
of a voxel off the voxel grid), its condition depth ray-cast by the data stage's renderer, and as the perfect
scene its voxels by the data stage's own surface voxeliser at 64³ (0.1 m voxels), so the perfect scene is what a
sample's true voxels would be, not a copy of the condition. Each reward must rank it above perturbed scenes and be
deterministic; the geometric pose estimator must recover a known camera offset."""

from __future__ import annotations

import builtins
import math
import sys
import types
from dataclasses import replace

import numpy as np
import pytest

from interiorfusion_core.errors import UserError
from interiorfusion_data.render import intrinsics, look_at, raycast
from interiorfusion_data.scene import Camera
from interiorfusion_finetune.config import RLConfig, RLRewardWeights
from interiorfusion_finetune.pose import GeometricPoseEstimator, View, load_pose_estimator, pose_error
from interiorfusion_finetune.rewards import (
    EditPair,
    RewardModel,
    combined_reward,
    depth_consistency,
    edit_quality,
    point_cloud_consistency,
    pose_stability,
    render_scene,
)
from interiorfusion_structure.generate import GeneratedScene

N, CUBE = 64, 6.4  # 0.1 m voxels
S = CUBE / N
OFF = 0.033  # the mesh is moved off the voxel grid by this along every axis (metres)
WALL, FLOOR, CEILING, CABINET = 1, 2, 3, 12
# (min, max, class): the room's slabs and a cabinet, metres.
ROOM = [
    ((0.4, 0.4, 0.2), (6.0, 6.0, 0.4), FLOOR),
    ((0.4, 0.4, 2.8), (6.0, 6.0, 3.0), CEILING),
    ((0.4, 0.4, 0.4), (0.6, 6.0, 2.8), WALL),
    ((5.8, 0.4, 0.4), (6.0, 6.0, 2.8), WALL),
    ((0.6, 0.4, 0.4), (5.8, 0.6, 2.8), WALL),
    ((0.6, 5.8, 0.4), (5.8, 6.0, 2.8), WALL),
]
CABINET_BOX = ((3.5, 3.0, 0.4), (4.5, 3.8, 1.3))
MOVED_BOX = ((1.8, 3.6, 0.4), (2.8, 4.4, 1.3))  # the cabinet after the edit (still in view)
SIZE = 96


def box_triangles(lo: tuple[float, ...], hi: tuple[float, ...]) -> np.ndarray:
    """The 12 triangles of an axis-aligned box (winding irrelevant: rendered without culling)."""
    c = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    return np.array([tri for a, b, cc, d in quads for tri in ([c[a], c[b], c[cc]], [c[a], c[cc], c[d]])])


def mesh(boxes: list) -> tuple[np.ndarray, np.ndarray]:
    """(triangles [F, 3, 3], class per face) of the boxes, moved by OFF."""
    tris = np.concatenate([box_triangles(np.add(lo, OFF), np.add(hi, OFF)) for lo, hi, _ in boxes])
    return tris, np.concatenate([np.full(12, c) for *_, c in boxes])


def scene_of(boxes: list) -> GeneratedScene:
    """The boxes' true voxels: the data stage's surface voxelisation of their mesh."""
    from interiorfusion_data.voxelize import voxelize

    tris, cls = mesh(boxes)
    grid = voxelize(tris, np.zeros((len(tris), 8), np.float32), N, np.zeros(3), S, face_class=cls)
    assert grid.labels is not None
    return GeneratedScene(cells=np.zeros((0, 3), np.int64), voxels=grid.coords.astype(np.int64),
                          classes=grid.labels.astype(np.int64), resolution=N, origin=np.zeros(3), cube_size=CUBE)


def with_voxels(scene: GeneratedScene, voxels: np.ndarray, classes: np.ndarray | None = None) -> GeneratedScene:
    voxels = np.asarray(voxels, np.int64)
    keep = ((voxels >= 0) & (voxels < N)).all(1)
    classes = scene.classes if classes is None else classes
    return replace(scene, voxels=voxels[keep], classes=np.asarray(classes)[keep])


CAMERA = Camera(intrinsics(SIZE, SIZE, 75.0), look_at(np.array([1.3, 1.2, 1.6]), np.array([4.0, 3.4, 0.9])),
                SIZE, SIZE)


def mesh_view(boxes: list, camera: Camera = CAMERA) -> View:
    """The condition: z-depth of the mesh (the voxels' source geometry)."""
    _, depth = raycast(mesh(boxes)[0], camera)
    return View(depth.reshape(camera.height, camera.width).astype(np.float64), camera.K, camera.pose)


SCENE_BOXES = [*ROOM, (*CABINET_BOX, CABINET)]
MOVED_BOXES = [*ROOM, (*MOVED_BOX, CABINET)]


@pytest.fixture(scope="module")
def room() -> tuple[GeneratedScene, View]:
    return scene_of(SCENE_BOXES), mesh_view(SCENE_BOXES)


def rotated(scene: GeneratedScene, degrees: float) -> GeneratedScene:
    """The scene turned about the vertical axis through the room's centre (voxels resampled, nearest)."""
    a = math.radians(degrees)
    R = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    centre = np.array([32.0, 32.0, 0.0])
    return with_voxels(scene, np.floor((scene.voxels + 0.5 - centre) @ R.T + centre).astype(np.int64))


def perturbations(scene: GeneratedScene) -> dict[str, GeneratedScene]:
    rng = np.random.default_rng(0)
    interior = rng.integers([8, 8, 5], [56, 56, 26], size=(300, 3))  # inside the room, above the floor
    centre = np.array([32, 32, 4])
    scaled = np.round((scene.voxels - centre) * 1.15 + centre).astype(np.int64)
    return {
        "shifted_3_voxels": with_voxels(scene, scene.voxels + np.array([3, 0, 0])),
        "shifted_1_voxel": with_voxels(scene, scene.voxels + np.array([0, 1, 0])),
        "rotated_4deg": rotated(scene, 4.0),
        "scaled_1.15": with_voxels(scene, scaled),
        "object_removed": scene_of(ROOM),
        "noise_300_voxels": with_voxels(scene, np.concatenate([scene.voxels, interior]),
                                        np.concatenate([scene.classes, np.full(300, CABINET)])),
        "empty": with_voxels(scene, np.zeros((0, 3), np.int64), np.zeros(0, np.int64)),
    }


# What each reward must rank below the perfect scene. pose_stability measures where the room is, not what is in
# it: removing the cabinet or adding floating voxels leaves the walls that pin the pose (checked below instead).
RIGID = ("shifted_3_voxels", "shifted_1_voxel", "rotated_4deg", "scaled_1.15", "empty")
REWARD_FNS = {
    "depth_consistency": (lambda s, v: depth_consistency(s, v), None),
    "point_cloud_consistency": (lambda s, v: point_cloud_consistency(s, v), None),
    "pose_stability": (lambda s, v: pose_stability(s, v, GeometricPoseEstimator()), RIGID),
}


@pytest.mark.parametrize("name", list(REWARD_FNS))
def test_perfect_scene_beats_every_perturbation(room: tuple[GeneratedScene, View], name: str) -> None:
    scene, view = room
    fn, ranked = REWARD_FNS[name]
    perfect = fn(scene, view)
    scores = {k: fn(s, view) for k, s in perturbations(scene).items()}
    print(name, f"perfect={perfect:.4f}", {k: round(v, 4) for k, v in scores.items()})
    assert 0.0 < perfect <= 1.0
    for k, v in scores.items():
        if ranked is None or k in ranked:
            assert 0.0 <= v < perfect, (k, v, perfect)
        else:  # insensitive by design, but not thrown off either
            assert abs(v - perfect) < 0.1, (k, v, perfect)
    assert scores["empty"] == 0.0
    assert fn(scene, view) == perfect  # deterministic


def test_voxel_render_is_the_cubes(room: tuple[GeneratedScene, View]) -> None:
    """The render of the voxels equals the ray-cast of the scene's .glb mesh (generate.exposed_faces, built
    independently): the cube faces, their winding under back-face culling and the z-depth are right."""
    from interiorfusion_structure.generate import exposed_faces

    scene, _ = room
    verts, faces = exposed_faces(scene.voxels, {tuple(v) for v in scene.voxels.tolist()})
    _, exact = raycast(scene.origin + verts[faces] * scene.voxel_size, CAMERA)
    exact = exact.reshape(SIZE, SIZE)
    r = render_scene(scene, View(np.zeros((SIZE, SIZE)), CAMERA.K, CAMERA.pose), rgb=True)
    assert ((r.view.depth > 0) == (exact > 0)).all()
    assert np.abs(r.view.depth - exact).max() < 1e-4
    assert (r.voxel >= 0).all() and r.view.rgb is not None
    assert {WALL, FLOOR, CABINET} <= set(scene.classes[r.visible].tolist())
    # The visible voxels' centres, in camera coordinates, are the render's surface points.
    cam = np.linalg.inv(CAMERA.pose)
    assert r.view.points is not None
    assert np.allclose(r.view.points, scene.points()[r.visible] @ cam[:3, :3].T + cam[:3, 3])


def offset_pose(degrees: float, axis: tuple[float, float, float], t: tuple[float, float, float]) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    T = np.eye(4)
    T[:3, :3] = Rotation.from_rotvec(math.radians(degrees) * np.asarray(axis) / np.linalg.norm(axis)).as_matrix()
    T[:3, 3] = t
    return T


@pytest.mark.parametrize(("degrees", "t"), [(2.0, (0.04, -0.03, 0.05)), (-3.0, (-0.08, 0.02, 0.0))])
def test_geometric_estimator_recovers_a_camera_offset(degrees: float, t: tuple[float, float, float]) -> None:
    delta = offset_pose(degrees, (0.3, 1.0, 0.2), t)  # the query camera in the reference camera's frame
    reference = mesh_view(SCENE_BOXES)
    query = mesh_view(SCENE_BOXES, Camera(CAMERA.K, CAMERA.pose @ delta, SIZE, SIZE))
    T = GeometricPoseEstimator().relative_pose(reference, query)
    assert T is not None
    angle, dist = pose_error(np.linalg.inv(delta) @ T)
    print(f"offset {degrees}° {t}: residual {angle:.3f}° {dist * 100:.2f} cm")
    assert angle < 0.3 and dist < 0.01
    # A condition whose depth was seen from elsewhere than its pose says is not "stable": the reward sees it.
    est, scene = GeometricPoseEstimator(), scene_of(SCENE_BOXES)
    mislabelled = View(query.depth, CAMERA.K, CAMERA.pose)
    assert pose_stability(scene, mislabelled, est) < pose_stability(scene, reference, est) - 0.2


# ------------------------------------------------------------------------------------------------ edits
def object_box(box: tuple[tuple[float, ...], tuple[float, ...]]) -> list[list[float]]:
    """The object's box as the data stage knows it: its mesh's extent."""
    return [list(np.add(box[0], OFF)), list(np.add(box[1], OFF))]


def test_edit_quality_rewards_a_local_edit(room: tuple[GeneratedScene, View]) -> None:
    original = room[0]
    boxes = [object_box(CABINET_BOX), object_box(MOVED_BOX)]
    moved = scene_of(MOVED_BOXES)
    rng = np.random.default_rng(2)
    far = rng.integers([8, 8, 18], [56, 56, 26], size=(200, 3))  # above every box: outside the region
    candidates = {
        "unchanged": original,
        "only_removed": scene_of(ROOM),
        "only_added": scene_of([*SCENE_BOXES, (*MOVED_BOX, CABINET)]),
        "moved_and_shifted_1_voxel": with_voxels(moved, moved.voxels + np.array([1, 0, 0])),
        "moved_plus_noise_outside": with_voxels(moved, np.concatenate([moved.voxels, far]),
                                                np.concatenate([moved.classes, np.full(200, CABINET)])),
        "empty": with_voxels(moved, np.zeros((0, 3), np.int64), np.zeros(0, np.int64)),
    }
    perfect = edit_quality(EditPair(original, moved, boxes))
    scores = {k: edit_quality(EditPair(original, s, boxes)) for k, s in candidates.items()}
    print(f"edit_quality perfect={perfect:.4f}", {k: round(v, 4) for k, v in scores.items()})
    assert 0.8 < perfect <= 1.0
    for k, v in scores.items():
        assert 0.0 <= v < perfect, (k, v, perfect)
    assert scores["unchanged"] == 0.0
    assert edit_quality(EditPair(original, moved, boxes)) == perfect
    # The region is the union of the boxes: the same edit judged against one box is worse.
    assert edit_quality(EditPair(original, moved, [object_box(CABINET_BOX)])) < perfect


def test_edit_pair_needs_one_frame(room: tuple[GeneratedScene, View]) -> None:
    scene = room[0]
    with pytest.raises(ValueError, match="one voxel frame"):
        EditPair(scene, replace(scene, origin=np.ones(3)), [object_box(CABINET_BOX)])
    with pytest.raises(ValueError, match="min ≤ max"):
        EditPair(scene, scene, [[[1, 1, 1], [0, 2, 2]]])


# ------------------------------------------------------------------------------------------------ combined
def test_combined_reward_renormalises_over_present_rewards() -> None:
    w = RLRewardWeights()
    r = combined_reward({"depth_consistency": 0.9, "point_cloud_consistency": 0.6, "pose_stability": 0.3}, w)
    assert r.weights == pytest.approx({k: 1 / 3 for k in r.values})
    assert r.total == pytest.approx(0.6)
    full = combined_reward({**r.values, "edit_quality": 1.0}, w)
    assert full.total == pytest.approx((0.9 + 0.6 + 0.3 + 1.0) / 4)
    skewed = combined_reward({"depth_consistency": 1.0, "pose_stability": 0.0},
                             RLRewardWeights(depth_consistency=3, point_cloud_consistency=0, pose_stability=1))
    assert skewed.total == pytest.approx(0.75) and set(skewed.weights) == {"depth_consistency", "pose_stability"}
    with pytest.raises(ValueError, match="unknown rewards: chamfer"):
        combined_reward({"chamfer": 1.0}, w)


def test_reward_model(room: tuple[GeneratedScene, View]) -> None:
    scene, view = room
    model = RewardModel(RLConfig())
    perfect = model(scene, view)
    shifted = model(perturbations(scene)["shifted_3_voxels"], view)
    print("RewardModel perfect", perfect, "shifted_3_voxels", shifted)
    assert set(perfect.values) == {"depth_consistency", "point_cloud_consistency", "pose_stability"}
    assert perfect.values["depth_consistency"] == depth_consistency(scene, view)
    assert shifted.total < perfect.total
    moved = scene_of(MOVED_BOXES)
    edit = EditPair(scene, moved, [object_box(CABINET_BOX), object_box(MOVED_BOX)])
    with_edit = model(moved, mesh_view(MOVED_BOXES), edit)
    assert with_edit.values["edit_quality"] == edit_quality(edit)
    assert sum(with_edit.weights.values()) == pytest.approx(1.0) and len(with_edit.weights) == 4
    with pytest.raises(ValueError, match="edited scene"):
        model(scene, view, edit)
    # A zero weight is not computed (and no pose estimator is built for it).
    lean = RewardModel(RLConfig(reward_weights={"pose_stability": 0, "edit_quality": 0}))
    assert lean.pose_estimator is None and set(lean(scene, view).values) == {"depth_consistency",
                                                                            "point_cloud_consistency"}


def test_views_are_resampled_to_the_render_size() -> None:
    big = mesh_view(SCENE_BOXES, Camera(intrinsics(2 * SIZE, 2 * SIZE, 75.0), CAMERA.pose, 2 * SIZE, 2 * SIZE))
    small = big.resized(SIZE)
    assert small.size == (SIZE, SIZE) and np.allclose(small.K, CAMERA.K)
    # Nearest sampling hits a source pixel half a source pixel off each new pixel's ray: centimetres here.
    assert np.median(np.abs(small.depth - mesh_view(SCENE_BOXES).depth)) < 0.03
    assert big.resized(4 * SIZE) is big


def test_view_from_batch() -> None:
    import torch

    batch = {"depth": torch.ones(2, 4, 6), "intrinsics": torch.eye(3).repeat(2, 1, 1),
             "cam_to_world": torch.eye(4).repeat(2, 1, 1), "rgb": torch.zeros(2, 3, 4, 6)}
    v = View.from_batch(batch, 1)
    assert v.size == (4, 6) and v.rgb is not None and v.rgb.shape == (4, 6, 3)


# ------------------------------------------------------------------------------------------------ vggt
def _one_sentence(message: str) -> None:
    assert "\n" not in message and message.endswith(".")
    assert message.count(". ") == 0, message


def test_vggt_without_the_package_is_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_vggt(name: str, *args: object, **kwargs: object) -> object:
        if name == "vggt" or name.startswith("vggt."):
            raise ModuleNotFoundError(f"No module named {name.split('.')[0]!r}")
        return real_import(name, *args, **kwargs)

    for mod in [m for m in sys.modules if m == "vggt" or m.startswith("vggt.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(builtins, "__import__", no_vggt)
    with pytest.raises(UserError) as err:
        RewardModel(RLConfig(pose_estimator="vggt"))
    message = str(err.value)
    print(message)
    _one_sentence(message)
    assert "rl.pose_estimator" in message and "pip install git+https://github.com/facebookresearch/vggt" in message
    # Weights of zero for pose_stability need no estimator at all.
    assert RewardModel(RLConfig(pose_estimator="vggt", reward_weights={"pose_stability": 0})).pose_estimator is None


def _fake_vggt(monkeypatch: pytest.MonkeyPatch, model_cls: type) -> None:
    pkg, models, vggt_mod, utils, pose_enc = (types.ModuleType(n) for n in (
        "vggt", "vggt.models", "vggt.models.vggt", "vggt.utils", "vggt.utils.pose_enc"))
    vggt_mod.VGGT = model_cls
    pose_enc.pose_encoding_to_extri_intri = lambda enc, hw: (enc, None)
    for m in (pkg, models, vggt_mod, utils, pose_enc):
        monkeypatch.setitem(sys.modules, m.__name__, m)


def test_vggt_without_weights_is_one_sentence(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    class NoWeights:
        @classmethod
        def from_pretrained(cls, source: str, local_files_only: bool = False) -> NoWeights:
            raise LocalEntryNotFoundError(f"{source} is not in the cache")

    _fake_vggt(monkeypatch, NoWeights)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        load_pose_estimator(RLConfig(pose_estimator="vggt", vggt_model="microsoft/VGGT-1B"))
    message = str(err.value)
    print(message)
    _one_sentence(message)
    assert "rl.vggt_model" in message and "'facebook/VGGT-1B'" in message and "hf download" in message
    with pytest.raises(UserError, match=r"rl\.vggt_model: the local directory .* does not exist") as err:
        load_pose_estimator(RLConfig(pose_estimator="vggt", vggt_model=f"{tmp_path}/missing"))
    _one_sentence(str(err.value))


def test_vggt_random_init_needs_vggt() -> None:
    with pytest.raises(ValueError, match="rl.vggt_random_init is true but rl.pose_estimator is not vggt"):
        RLConfig(vggt_random_init=True)


def test_policy_flows_and_sde_window_are_checked() -> None:
    assert RLConfig().policy_flows == ["occupancy", "latent"]
    with pytest.raises(ValueError, match="names a flow twice"):
        RLConfig(policy_flows=["latent", "latent"])
    with pytest.raises(ValueError):
        RLConfig(policy_flows=[])
    with pytest.raises(ValueError):
        RLConfig(policy_flows=["materials"])
    with pytest.raises(ValueError, match="rl.sde_window 7 is more than rl.sampling_steps 6"):
        RLConfig(sampling_steps=6, sde_window=7)
    assert RLConfig(sampling_steps=6, sde_window=2).sde_window == 2


def test_vggt_estimator_reads_the_camera_head(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a stand-in network (the real one is not installable here): the query's pose is the reference camera
    from the query camera inverted, its translation rescaled by the reference depth over VGGT's."""
    import torch

    delta = offset_pose(5.0, (0.0, 1.0, 0.0), (0.2, 0.0, 0.1))

    class Stub(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
            S, _, H, W = images.shape
            extrinsic = torch.from_numpy(np.stack([np.eye(4), np.linalg.inv(delta)])[:, :3]).float()
            extrinsic[1, :, 3] /= 2.0  # VGGT's normalised units: half the metres
            return {"pose_enc": extrinsic[None], "depth": torch.full((1, S, H, W, 1), 1.5)}

    _fake_vggt(monkeypatch, Stub)
    estimator = load_pose_estimator(RLConfig(pose_estimator="vggt", vggt_random_init=True), "cpu")
    view = View(np.full((20, 30), 3.0), CAMERA.K, CAMERA.pose, np.zeros((20, 30, 3)))
    T = estimator.relative_pose(view, view)
    assert T is not None and np.allclose(T, delta, atol=1e-5)  # depth ratio 3.0 / 1.5 restores the metres
