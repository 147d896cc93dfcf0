"""Geometric rewards for GRPO fine-tuning of the Structure DiT (stage 4b; docs/finetune-rewards.md).

Each reward scores one generated scene (`GeneratedScene`, in the data's voxel frame) against its conditions (one
condition `View`: z-depth, K, cam_to_world) and is a float in [0, 1], higher is better, exp(-error / scale) with the
scales of `rl.reward_params`. They are pure functions of numpy arrays, deterministic, CPU only.

    model = RewardModel(config.rl)                        # builds the pose estimator (rl.pose_estimator)
    result = model(scene, View.from_batch(batch, b))      # RewardResult: total, values per reward, weights

The scene is seen through the shared ray caster (interiorfusion_data.render.raycast) with every voxel a cube: the
exposed faces of the occupied voxels are the triangles, back faces culled (their winding points outwards). The
render gives the depth the camera sees and which voxels it sees. The data stage's voxels are surface voxels (a
voxel is occupied iff the surface passes through its cube, docs/data-format.md), so a cube's visible face lies
0–1 voxel in front of the true surface while its centre is on it on average: rewards that need surface points
(point_cloud_consistency, the geometric pose estimator) use the centres of the voxels the render sees.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from interiorfusion_finetune.config import RLConfig, RLRewardParams, RLRewardWeights
from interiorfusion_finetune.pose import (
    GeometricPoseEstimator,
    PoseEstimator,
    View,
    even_subset,
    load_pose_estimator,
    pose_error,
)
from interiorfusion_structure.generate import GeneratedScene

REWARDS = ("depth_consistency", "point_cloud_consistency", "pose_stability", "edit_quality")
DEFAULTS = RLRewardParams()


# ------------------------------------------------------------------------------------------------ rendering
def voxel_triangles(scene: GeneratedScene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exposed cube faces of the scene's voxels as triangles [F, 3, 3] (world metres, outward winding), the
    voxel row of each triangle [F] and its face direction [F] (an index into generate's face table)."""
    from interiorfusion_structure.generate import _FACE_DIRS  # the one face table (also the .glb export's)

    vox = np.asarray(scene.voxels, np.int64).reshape(-1, 3)
    N = scene.resolution
    # A dense grid with a one-voxel border answers "is the neighbour occupied" without a Python loop.
    grid = np.zeros((N + 2,) * 3, bool)
    grid[vox[:, 0] + 1, vox[:, 1] + 1, vox[:, 2] + 1] = True
    tris, owner, direction = [], [], []
    for k, (d, quad) in enumerate(_FACE_DIRS):
        nb = vox + d + 1
        rows = np.flatnonzero(~grid[nb[:, 0], nb[:, 1], nb[:, 2]])
        corners = vox[rows][:, None, :] + np.asarray(quad)[None]  # [Q, 4, 3] voxel units
        tris.append(np.concatenate([corners[:, [0, 1, 2]], corners[:, [0, 2, 3]]]))
        owner.append(np.concatenate([rows, rows]))
        direction.append(np.full(2 * len(rows), k))
    points = np.asarray(scene.origin, np.float64) + np.concatenate(tris).astype(np.float64) * scene.voxel_size
    return points, np.concatenate(owner), np.concatenate(direction)


@dataclass
class SceneRender:
    """The generated scene seen from a view's camera: `view` has the render's depth (where each pixel's ray enters
    the first voxel it meets; and RGB when asked for) with the view's camera, and as its `points` the camera-frame
    centres of the visible voxels; `exit_depth` [H, W] the z-depth where that ray leaves the same voxel's cube;
    `voxel` [H, W] the visible voxel's row in scene.voxels. Both are -1/0 where nothing is hit."""

    view: View
    voxel: np.ndarray
    exit_depth: np.ndarray

    @property
    def visible(self) -> np.ndarray:
        """Rows of scene.voxels that the camera sees (sorted)."""
        return np.unique(self.voxel[self.voxel >= 0])


def render_scene(scene: GeneratedScene, view: View, rgb: bool = False) -> SceneRender:
    """Ray-cast the scene's voxel cubes from `view`'s camera at `view`'s size. The RGB (when `rgb`) is the class
    colour shaded by the angle to the ray, so an image model sees the geometry."""
    from interiorfusion_data.render import ray_directions, raycast
    from interiorfusion_data.scene import Camera
    from interiorfusion_structure.generate import _FACE_DIRS, class_colors

    h, w = view.size
    if not len(scene.voxels):
        image = np.ones((h, w, 3)) if rgb else None
        return SceneRender(View(np.zeros((h, w)), view.K, view.cam_to_world, image, np.zeros((0, 3))),
                           np.full((h, w), -1), np.zeros((h, w)))
    triangles, owner, direction = voxel_triangles(scene)
    face, depth = raycast(triangles, Camera(view.K, view.cam_to_world, w, h), cull_backfaces=True)
    hit = face >= 0
    voxel = np.where(hit, owner[np.maximum(face, 0)], -1)
    image = None
    if rgb:
        palette = class_colors().astype(np.float64) / 255.0
        normals = np.array([d for d, _ in _FACE_DIRS], np.float64) @ view.cam_to_world[:3, :3]  # camera frame
        rays = ray_directions(view.K, w, h)
        rays /= np.linalg.norm(rays, axis=1, keepdims=True)
        image = np.ones((h * w, 3))
        cls = np.asarray(scene.classes, np.int64)[voxel[hit]] % len(palette)
        lambert = np.abs((normals[direction[face[hit]]] * rays[hit]).sum(1))
        image[hit] = palette[cls] * (0.35 + 0.65 * lambert[:, None])
        image = image.reshape(h, w, 3)
    # Exit of each hit ray from its voxel's cube (slab test; a ray's parameter is its z-depth: its camera-frame
    # direction has z = 1).
    exit_depth = np.zeros(h * w)
    R, eye = view.cam_to_world[:3, :3], view.cam_to_world[:3, 3]
    dirs = ray_directions(view.K, w, h)[hit] @ R.T
    lo = np.asarray(scene.origin) + np.asarray(scene.voxels, np.float64)[voxel[hit]] * scene.voxel_size
    with np.errstate(divide="ignore", invalid="ignore"):
        far = np.where(dirs > 0, lo + scene.voxel_size - eye, lo - eye) / dirs
    exit_depth[hit] = np.where(np.isfinite(far), far, np.inf).min(1)
    world_to_cam = np.linalg.inv(view.cam_to_world)
    centres = scene.points()[np.unique(voxel[hit])]
    points = centres @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
    return SceneRender(View(depth.reshape(h, w).astype(np.float64), view.K, view.cam_to_world, image, points),
                       voxel.reshape(h, w), exit_depth.reshape(h, w))


def _render(scene: GeneratedScene, view: View, render: SceneRender | None, rgb: bool = False) -> SceneRender:
    """`render` (a render_scene of this scene from this view, shared by several rewards) or a fresh one."""
    if render is None:
        return render_scene(scene, view, rgb)
    if rgb and render.view.rgb is None:
        raise ValueError("this pose estimator needs an RGB render: render_scene(..., rgb=True)")
    return render


def _require_depth(view: View) -> None:
    if not (view.depth > 0).any():
        raise ValueError("the condition view has no valid depth pixel: its geometric rewards are undefined")


# ------------------------------------------------------------------------------------------------ rewards
def depth_consistency(scene: GeneratedScene, view: View, *, scale_m: float = DEFAULTS.depth_scale_m,
                      render_only_weight: float = DEFAULTS.depth_render_only_weight,
                      render: SceneRender | None = None) -> float:
    """coverage · exp(−mean depth error / scale_m) over the pixels valid in both the render and the condition.

    A pixel's depth error is the distance from the condition's depth to the depth interval its ray spends in the
    voxel it sees ([entry, exit] of that cube; 0 inside it): a surface voxel only says that the surface passes
    through its cube, so a perfect scene's front faces lie up to a voxel before the true surface and must not be
    charged for it. coverage = both / (both + condition-only + render_only_weight · render-only) counts the
    pixels valid in only one map as misses: the scene lacks a surface the condition sees, or shows one where the
    condition has no value."""
    _require_depth(view)
    r = _render(scene, view, render)
    entry, cond = r.view.depth, view.depth
    valid_c, valid_r = cond > 0, entry > 0
    both = valid_c & valid_r
    n_both = int(both.sum())
    if not n_both:
        return 0.0
    n_cond, n_rend = int((valid_c & ~valid_r).sum()), int((valid_r & ~valid_c).sum())
    coverage = n_both / (n_both + n_cond + render_only_weight * n_rend)
    d = cond[both]
    error = float(np.maximum(np.maximum(entry[both] - d, d - r.exit_depth[both]), 0.0).mean())
    return float(coverage * math.exp(-error / scale_m))


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric Chamfer distance: the mean of both directions' mean nearest-neighbour distances (metres)."""
    from scipy.spatial import cKDTree

    return float(0.5 * (cKDTree(b).query(a, k=1)[0].mean() + cKDTree(a).query(b, k=1)[0].mean()))


def point_cloud_consistency(scene: GeneratedScene, view: View, *, scale_m: float = DEFAULTS.chamfer_scale_m,
                            max_points: int = DEFAULTS.max_points, render: SceneRender | None = None) -> float:
    """exp(−Chamfer / scale_m) between the scene's surface visible from the condition camera (the centres of the
    voxels its render sees: surface voxels are centred on the surface, and each counts once however near the
    camera) and the condition depth unprojected. 0 when the scene shows nothing from the camera."""
    _require_depth(view)
    seen = even_subset(scene.points()[_render(scene, view, render).visible], max_points)
    if not len(seen):
        return 0.0
    return float(math.exp(-chamfer(seen, even_subset(view.world_points(), max_points)) / scale_m))


def pose_stability(scene: GeneratedScene, view: View, estimator: PoseEstimator | None = None, *,
                   rotation_scale_deg: float = DEFAULTS.pose_rotation_scale_deg,
                   translation_scale_m: float = DEFAULTS.pose_translation_scale_m,
                   render: SceneRender | None = None) -> float:
    """exp(−(angle / rotation_scale_deg + distance / translation_scale_m)) of the pose the estimator finds for
    the scene's render from the condition camera relative to the condition view (the identity when the scene
    agrees with it; the geometric estimator registers the visible voxels' centres onto the condition depth). 0
    when no pose can be estimated (nothing rendered)."""
    _require_depth(view)
    estimator = estimator or GeometricPoseEstimator()
    rendered = _render(scene, view, render, rgb=estimator.needs_rgb).view
    if not (rendered.depth > 0).any():
        return 0.0
    T = estimator.relative_pose(view, rendered)
    if T is None:
        return 0.0
    angle, distance = pose_error(T)
    return float(math.exp(-(angle / rotation_scale_deg + distance / translation_scale_m)))


# ------------------------------------------------------------------------------------------------ edits
@dataclass
class EditPair:
    """What edit_quality needs about one edit, all in one voxel frame (same origin, cube size, resolution):

    - `original`: the scene generated from the original conditions;
    - `edited`: the scene generated from the edited conditions (the sample being rewarded);
    - `boxes` [K, 2, 3]: the edited region as axis-aligned boxes (min corner, max corner) in the frame's metres,
      the edited object's old and new boxes (one for an added or removed object); the region is their union, not
      their bounding box (a move across the room must not excuse the furniture in between).

    The data stage writes edit pairs (original and edited condition views of one room, the boxes); the trainer
    generates both scenes from them."""

    original: GeneratedScene
    edited: GeneratedScene
    boxes: np.ndarray

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, np.float64).reshape(-1, 2, 3)
        a, b = self.original, self.edited
        if (a.resolution != b.resolution or not math.isclose(a.cube_size, b.cube_size)
                or not np.allclose(a.origin, b.origin)):
            raise ValueError("an edit pair's scenes must share one voxel frame (resolution, origin, cube size)")
        if not len(self.boxes) or (self.boxes[:, 1] < self.boxes[:, 0]).any():
            raise ValueError("an edit pair needs at least one box with min ≤ max on every axis")


def _keys(voxels: np.ndarray, N: int) -> np.ndarray:
    v = np.asarray(voxels, np.int64).reshape(-1, 3)
    return np.unique((v[:, 0] * N + v[:, 1]) * N + v[:, 2])


def in_region(voxels: np.ndarray, scene: GeneratedScene, boxes: np.ndarray, margin_m: float = 0.0) -> np.ndarray:
    """[V] bool: which voxels' cubes overlap (with positive volume) any box grown by `margin_m`."""
    lo = np.asarray(scene.origin) + np.asarray(voxels, np.float64) * scene.voxel_size  # [V, 3] cube min corners
    hi = lo + scene.voxel_size
    bmin, bmax = boxes[:, 0] - margin_m, boxes[:, 1] + margin_m  # [K, 3]
    overlap = (lo[:, None] < bmax[None]) & (hi[:, None] > bmin[None])  # [V, K, 3]
    return overlap.all(-1).any(-1)


def edit_quality(pair: EditPair, *, margin_m: float = DEFAULTS.edit_margin_m) -> float:
    """The F1 score of the change, with the edited region as what should change: precision = the share of the
    changed voxels (occupied in exactly one scene) that lie in the region, recall = the share of the region's
    voxels (occupied in either scene) that changed. 0 when nothing changed. Occupancy only (classes ignored)."""
    N = pair.original.resolution
    a, b = _keys(pair.original.voxels, N), _keys(pair.edited.voxels, N)
    changed = np.setxor1d(a, b, assume_unique=True)
    if not len(changed):
        return 0.0
    either = np.union1d(a, b)

    def inside(keys: np.ndarray) -> np.ndarray:
        ijk = np.stack([keys // (N * N), keys // N % N, keys % N], 1)
        return in_region(ijk, pair.original, pair.boxes, margin_m)

    changed_in = int(inside(changed).sum())
    region = int(inside(either).sum())
    if not changed_in:
        return 0.0
    precision, recall = changed_in / len(changed), changed_in / region
    return float(2 * precision * recall / (precision + recall))


# ------------------------------------------------------------------------------------------------ combined
@dataclass
class RewardResult:
    total: float  # Σ w_i r_i / Σ w_i over the rewards computed
    values: dict[str, float]  # each computed reward (for logging)
    weights: dict[str, float] = field(default_factory=dict)  # the weights applied, renormalised to sum 1


def combined_reward(values: Mapping[str, float], weights: RLRewardWeights) -> RewardResult:
    """The weighted mean of the rewards in `values` with a positive weight: the weights of rewards that are absent
    (edit_quality for a sample without an edit pair) or zero drop out and the rest are renormalised to sum 1, so
    every total is in [0, 1] whichever rewards a sample has."""
    unknown = set(values) - set(REWARDS)
    if unknown:
        raise ValueError(f"unknown rewards: {', '.join(sorted(unknown))} (known: {', '.join(REWARDS)})")
    w = {name: float(getattr(weights, name)) for name in REWARDS if name in values and getattr(weights, name) > 0}
    if not w:
        raise ValueError("no reward with a positive weight was computed for this sample")
    norm = sum(w.values())
    w = {k: v / norm for k, v in w.items()}
    return RewardResult(float(sum(w[k] * values[k] for k in w)), dict(values), w)


class RewardModel:
    """The rewards of `config.reward_weights` with `config.reward_params`, one render per sample shared by the
    depth, point-cloud and pose rewards. Rewards with weight 0 are not computed."""

    def __init__(self, config: RLConfig, pose_estimator: PoseEstimator | None = None, device: str | None = None):
        self.config = config
        self.params = config.reward_params
        self.weights = config.reward_weights
        needs_pose = self.weights.pose_stability > 0
        self.pose_estimator = pose_estimator or (load_pose_estimator(config, device) if needs_pose else None)

    def __call__(self, scene: GeneratedScene, view: View, edit: EditPair | None = None) -> RewardResult:
        """Rewards of `scene` against its condition `view`; with an edit pair, `scene` is its edited scene and
        `view` the edited condition view, and edit_quality is added."""
        p, w = self.params, self.weights
        if edit is not None and edit.edited is not scene:
            raise ValueError("with an edit pair, the scene rewarded must be the pair's edited scene")
        values: dict[str, float] = {}
        view_needed = w.depth_consistency > 0 or w.point_cloud_consistency > 0 or w.pose_stability > 0
        if view_needed:
            small = view.resized(p.render_size)
            rgb = w.pose_stability > 0 and self.pose_estimator is not None and self.pose_estimator.needs_rgb
            render = render_scene(scene, small, rgb=rgb)
            if w.depth_consistency > 0:
                values["depth_consistency"] = depth_consistency(
                    scene, small, scale_m=p.depth_scale_m, render_only_weight=p.depth_render_only_weight,
                    render=render)
            if w.point_cloud_consistency > 0:
                values["point_cloud_consistency"] = point_cloud_consistency(
                    scene, small, scale_m=p.chamfer_scale_m, max_points=p.max_points, render=render)
            if w.pose_stability > 0:
                values["pose_stability"] = pose_stability(
                    scene, small, self.pose_estimator, rotation_scale_deg=p.pose_rotation_scale_deg,
                    translation_scale_m=p.pose_translation_scale_m, render=render)
        if edit is not None and w.edit_quality > 0:
            values["edit_quality"] = edit_quality(edit, margin_m=p.edit_margin_m)
        return combined_reward(values, w)

    def batch(self, scenes: Sequence[GeneratedScene], batch: Mapping[str, object],
              edits: Sequence[EditPair | None] | None = None) -> list[RewardResult]:
        """One RewardResult per scene of `generate_scenes(gen, batch)` (sample b against batch view b)."""
        edits = edits if edits is not None else [None] * len(scenes)
        return [self(s, View.from_batch(batch, b), e) for b, (s, e) in enumerate(zip(scenes, edits, strict=True))]


__all__ = [
    "REWARDS", "EditPair", "PoseEstimator", "RewardModel", "RewardResult", "SceneRender", "View", "chamfer",
    "combined_reward", "depth_consistency", "edit_quality", "in_region", "point_cloud_consistency",
    "pose_stability", "render_scene", "voxel_triangles",
]
