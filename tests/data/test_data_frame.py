"""The metric voxel frame: fixed scale and floor across scenes, and voxel ↔ metres ↔ pixel round trips at 1024³."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interiorfusion_core.errors import UserError
from interiorfusion_data.config import DataStageConfig
from interiorfusion_data.format import decode_sample
from interiorfusion_data.frame import (
    CUBE_SIZE,
    FLOOR_HEIGHT,
    VoxelFrame,
    metric_frame,
    pixel_to_world,
    pixel_to_world_torch,
    voxel_to_world_torch,
    world_to_pixel,
    world_to_pixel_torch,
)
from interiorfusion_data.pipeline import SceneSource, build_sample
from interiorfusion_data.scene import CLASSES

FINE = 1024


def tiny_cfg(**voxel: object) -> DataStageConfig:
    return DataStageConfig.model_validate({
        "num_scenes": 3, "render": {"views": 2, "image_size": 48}, "voxel": {"resolutions": [32, 64], **voxel}})


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    cfg = tiny_cfg()
    src = SceneSource(cfg)
    return [decode_sample(build_sample(src.scene(i), cfg, i).members, resolution=64) for i in range(2)]


def test_two_scenes_share_voxel_size_and_floor_height(samples: list[dict]) -> None:
    floor = CLASSES.index("floor")
    for s in samples:
        meta = s["meta"]
        assert meta["cube_size"] == pytest.approx(CUBE_SIZE)
        assert meta["voxel_size"] == {"32": CUBE_SIZE / 32, "64": CUBE_SIZE / 64}
        assert meta["frame"]["kind"] == "metric" and meta["frame"]["up"] == "+z"
        assert meta["frame"]["floor_height"] == pytest.approx(FLOOR_HEIGHT)
        frame = VoxelFrame.from_meta(meta)
        assert frame.floor_z == pytest.approx(0.0)  # procedural floors lie at z = 0
        k = s["coords"][s["labels"] == floor, 2]
        # Every floor voxel sits on one layer, the same in every scene: floor_height / voxel size.
        assert set(k.tolist()) == {int(FLOOR_HEIGHT // (CUBE_SIZE / 64))} == {frame.floor_voxel(64)}
        # Centred horizontally: the occupied voxels' xy extent is centred in the cube (within a voxel).
        lo, hi = s["coords"][:, :2].min(0), s["coords"][:, :2].max(0) + 1
        assert np.abs((lo + hi) / 2 - 32).max() <= 1.0
    a, b = samples
    assert a["voxel_size"] == b["voxel_size"]
    assert a["meta"]["scene"]["index"] != b["meta"]["scene"]["index"]
    assert a["coords"].shape != b["coords"].shape  # genuinely different rooms


def round_trip(frame: VoxelFrame, coords: np.ndarray, K: np.ndarray, pose: np.ndarray, dtype: type
               ) -> tuple[np.ndarray, np.ndarray]:
    """Voxel centre → pixel + depth → world → voxel in `dtype`: (recovered coords, error in voxels)."""
    h = frame.voxel_size(FINE)
    if dtype is np.float64:
        world = frame.voxel_to_world(coords, FINE)
        uv, z = world_to_pixel(world, K, pose)
        back = pixel_to_world(uv, z, K, pose)
        grid = frame.world_to_grid(back, FINE)
    else:  # the same formulas, every operand and intermediate in float32
        f = np.float32
        o, Kf, P = frame.origin.astype(f), K.astype(f), pose.astype(f)
        world = o + (coords.astype(f) + f(0.5)) * f(h)
        cam = (world - P[:3, 3]) @ P[:3, :3]
        img = cam @ Kf.T
        uv, z = img[:, :2] / cam[:, 2:3], cam[:, 2]
        ray = np.concatenate([uv, np.ones((len(uv), 1), f)], 1) @ np.linalg.inv(Kf).T
        back = (ray * z[:, None]) @ P[:3, :3].T + P[:3, 3]
        grid = (back - o) / f(h)
    err = np.abs(grid.astype(np.float64) - (coords + 0.5)).max(axis=1)
    return np.floor(grid).astype(np.int64), err


def visible_voxels(frame: VoxelFrame, K: np.ndarray, pose: np.ndarray, n: int, rng: np.random.Generator,
                   size: tuple[int, int]) -> np.ndarray:
    coords = rng.integers(0, FINE, (20 * n, 3))
    uv, z = world_to_pixel(frame.voxel_to_world(coords, FINE), K, pose)
    ok = (z > 0.05) & (uv[:, 0] >= 0) & (uv[:, 0] < size[0]) & (uv[:, 1] >= 0) & (uv[:, 1] < size[1])
    return coords[ok][:n]


def test_round_trip_within_half_a_voxel_at_1024_with_stored_cameras(samples: list[dict]) -> None:
    rng = np.random.default_rng(0)
    worst = {np.float64: 0.0, np.float32: 0.0}
    for s in samples:
        frame = VoxelFrame.from_meta(s["meta"])
        # Stored cameras (float32 in the sample) and the real occupied voxels, scaled to 1024³ (each 64³ voxel
        # holds 16³ fine ones: take a random one of them), plus random voxels the camera sees.
        fine = s["coords"].astype(np.int64) * 16 + rng.integers(0, 16, s["coords"].shape)
        for K, pose in zip(s["intrinsics"], s["cam_to_world"], strict=True):
            uv, z = world_to_pixel(frame.voxel_to_world(fine, FINE), K, pose)
            seen = fine[(z > 0.05) & (uv >= 0).all(1) & (uv < s["rgb"].shape[2]).all(1)]
            coords = np.concatenate([seen, visible_voxels(frame, K, pose, 2000, rng, (48, 48))])
            assert len(seen) > 100 and len(coords) > 1000
            for dtype in (np.float64, np.float32):
                back, err = round_trip(frame, coords, K, pose, dtype)
                np.testing.assert_array_equal(back, coords)
                worst[dtype] = max(worst[dtype], float(err.max()))
    assert worst[np.float64] < 1e-6  # measured 3e-13 voxel (stored cameras of 2 scenes)
    assert worst[np.float32] < 1e-2  # measured 2.4e-4 voxel: float32 positions are also fine at 1024³


def test_round_trip_random_points_and_cameras() -> None:
    rng = np.random.default_rng(1)
    frame = VoxelFrame(np.array([-5.12, -5.12, -0.245]), CUBE_SIZE, 0.0)
    for _ in range(5):
        # A camera anywhere in the cube, looking along a random direction.
        eye = frame.origin + rng.uniform(0.5, CUBE_SIZE - 0.5, 3)
        fwd = rng.normal(size=3)
        fwd /= np.linalg.norm(fwd)
        right = np.cross(fwd, [0.0, 0.0, 1.0])
        right /= np.linalg.norm(right)
        down = np.cross(fwd, right)
        pose = np.eye(4)
        pose[:3, :3] = np.stack([right, down, fwd], axis=1)
        pose[:3, 3] = eye
        f = rng.uniform(200, 2000)
        K = np.array([[f, 0, 512], [0, f, 512], [0, 0, 1]])
        coords = visible_voxels(frame, K, pose, 5000, rng, (1024, 1024))
        back, err = round_trip(frame, coords, K, pose, np.float64)
        np.testing.assert_array_equal(back, coords)
        assert err.max() < 1e-6
        # Random world points (not centres) map back to themselves and to the same voxel.
        pts = frame.voxel_to_world(coords, FINE) + rng.uniform(-0.49, 0.49, coords.shape) * frame.voxel_size(FINE)
        uv, z = world_to_pixel(pts, K, pose)
        again = pixel_to_world(uv, z, K, pose)
        assert np.abs(again - pts).max() < 1e-9
        np.testing.assert_array_equal(frame.world_to_voxel(again, FINE), coords)
        # The torch helpers agree with numpy.
        tw = voxel_to_world_torch(torch.as_tensor(coords), frame.origin, frame.voxel_size(FINE))
        tuv, tz = world_to_pixel_torch(tw, K, pose)
        tback = pixel_to_world_torch(tuv, tz, K, pose)
        np.testing.assert_allclose(tback.numpy(), frame.voxel_to_world(coords, FINE), atol=1e-9)
        np.testing.assert_allclose(tuv.numpy(), world_to_pixel(frame.voxel_to_world(coords, FINE), K, pose)[0],
                                   atol=1e-6)


def test_a_scene_too_large_for_the_cube_is_refused_by_name() -> None:
    with pytest.raises(UserError, match="scene big-hall does not fit the metric voxel cube"):
        metric_frame(np.zeros(3), np.array([12.0, 4.0, 3.0]), name="big-hall")
    frame = metric_frame(np.array([1.0, 2.0, 0.0]), np.array([9.0, 6.0, 3.0]))
    np.testing.assert_allclose(frame.origin, [5.0 - 5.12, 4.0 - 5.12, -0.245])


def test_config_refuses_procedural_rooms_larger_than_the_cube_and_fit_is_opt_in() -> None:
    with pytest.raises(ValueError, match="do not fit voxel.cube_size"):
        DataStageConfig.model_validate({"procedural": {"size_range": [3.0, 7.0]}, "voxel": {"cube_size": 6.0}})
    cfg = tiny_cfg(cube_size="fit")
    src = SceneSource(cfg)
    s = decode_sample(build_sample(src.scene(0), cfg, 0).members, fields=("voxels",))
    assert s["meta"]["frame"]["kind"] == "fit" and s["meta"]["cube_size"] < CUBE_SIZE
