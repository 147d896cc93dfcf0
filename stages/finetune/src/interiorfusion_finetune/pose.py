"""Camera pose estimators for the pose_stability reward (docs/finetune-rewards.md).

A `PoseEstimator` gets two views of a room, a reference (the condition view) and a query (a render of the
generated scene), and estimates the query camera's pose in the reference camera's frame: the 4×4 rigid transform
that maps query-camera coordinates to reference-camera coordinates. Both views come from the same camera when the
generated scene agrees with the condition, so the estimate should be the identity.

- `GeometricPoseEstimator`: point-to-plane ICP of the query's unprojected depth onto the reference's (nearest
  neighbours from a cKDTree, pairs beyond a distance dropped). CPU only, metric.
- `VGGTPoseEstimator`: Meta's VGGT on the two RGB images; its translations are rescaled to metres with the
  reference's depth. Needs the `vggt` package and the `rl.vggt_model` weights (`load_pose_estimator`).

Cameras follow the data format: OpenCV pinhole (x right, y down, z forward), cam_to_world poses, z-depth in
metres with 0 = no value, pixel (u, v) centred at (u + 0.5, v + 0.5).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from interiorfusion_core.errors import UserError
from interiorfusion_finetune.config import RLConfig

log = logging.getLogger("interiorfusion_finetune")

VGGT_INSTALL = "pip install git+https://github.com/facebookresearch/vggt"


@dataclass
class View:
    """One camera view: z-depth [H, W] metres (0 = no value), K [3, 3], cam_to_world [4, 4], optional RGB [H, W, 3]
    in [0, 1], optional `points` [P, 3]: camera-frame points that stand for the surface better than the unprojected
    depth (a voxel render's visible voxel centres, see rewards.render_scene)."""

    depth: np.ndarray
    K: np.ndarray
    cam_to_world: np.ndarray
    rgb: np.ndarray | None = None
    points: np.ndarray | None = None

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any], b: int) -> View:
        """Sample `b` of a structure condition batch (task.StructureData.collate: one view per sample)."""
        rgb = batch.get("rgb")
        return cls(
            depth=_numpy(batch["depth"][b]).astype(np.float64),
            K=_numpy(batch["intrinsics"][b]).astype(np.float64),
            cam_to_world=_numpy(batch["cam_to_world"][b]).astype(np.float64),
            rgb=None if rgb is None else np.moveaxis(_numpy(rgb[b]).astype(np.float64), 0, -1),
        )

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return int(self.depth.shape[0]), int(self.depth.shape[1])

    def resized(self, max_side: int) -> View:
        """The same camera at a longer side of at most `max_side` pixels (intrinsics scaled, maps sampled at the
        nearest source pixel of each new pixel centre); unchanged when already that small."""
        h, w = self.size
        scale = max_side / max(h, w)
        if scale >= 1:
            return self
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        sy, sx = nh / h, nw / w
        rows = np.minimum(((np.arange(nh) + 0.5) / sy).astype(np.int64), h - 1)
        cols = np.minimum(((np.arange(nw) + 0.5) / sx).astype(np.int64), w - 1)
        K = self.K.copy()
        K[0] *= sx
        K[1] *= sy
        rgb = None if self.rgb is None else self.rgb[rows][:, cols]
        return View(self.depth[rows][:, cols], K, self.cam_to_world, rgb, self.points)

    def camera_points(self) -> np.ndarray:
        """[N, 3] camera-frame points of the valid depth pixels (row-major order)."""
        return backproject(self.depth, self.K, np.eye(4))

    def surface_points(self) -> np.ndarray:
        """[N, 3] camera-frame samples of the surface: `points` when given, else the depth unprojected."""
        return self.points if self.points is not None else self.camera_points()

    def world_points(self) -> np.ndarray:
        return backproject(self.depth, self.K, self.cam_to_world)


def backproject(depth: np.ndarray, K: np.ndarray, pose: np.ndarray) -> np.ndarray:
    from interiorfusion_data.importers import backproject as data_backproject

    return data_backproject(depth, K, pose)


def _numpy(x: Any) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@runtime_checkable
class PoseEstimator(Protocol):
    """Estimates where `query`'s camera is relative to `reference`'s."""

    name: str
    needs_rgb: bool  # whether `query` must carry an RGB render (renders are cheaper without)

    def relative_pose(self, reference: View, query: View) -> np.ndarray | None:
        """[4, 4] query camera → reference camera (the query camera's pose in the reference camera's frame), or
        None when there is nothing to estimate it from (an empty view)."""
        ...


def pose_error(T: np.ndarray) -> tuple[float, float]:
    """(rotation angle in degrees, translation length in metres) of a rigid 4×4 transform."""
    cos = (np.trace(T[:3, :3]) - 1) / 2
    return math.degrees(math.acos(float(np.clip(cos, -1.0, 1.0)))), float(np.linalg.norm(T[:3, 3]))


def even_subset(points: np.ndarray, count: int) -> np.ndarray:
    """At most `count` rows, evenly spaced: deterministic, and spread over the image for row-major pixels."""
    if len(points) <= count:
        return points
    return points[np.linspace(0, len(points) - 1, count).astype(np.int64)]


def rotation(omega: np.ndarray) -> np.ndarray:
    """Rodrigues: the rotation matrix of a rotation vector (axis × angle in radians)."""
    angle = float(np.linalg.norm(omega))
    if angle < 1e-12:
        return np.eye(3)
    k = omega / angle
    Kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * Kx + (1 - math.cos(angle)) * Kx @ Kx


def surface_normals(points: np.ndarray, neighbours: int = 10) -> np.ndarray:
    """[N, 3] unit normals: the least-variance direction of each point's nearest neighbours (sign arbitrary)."""
    from scipy.spatial import cKDTree

    _, idx = cKDTree(points).query(points, k=min(neighbours, len(points)))
    local = points[idx] - points[idx].mean(1, keepdims=True)
    _, vecs = np.linalg.eigh(np.einsum("nki,nkj->nij", local, local))
    return vecs[:, :, 0]


def icp(src: np.ndarray, dst: np.ndarray, iterations: int, max_pair_m: float, min_pairs: int = 16,
        tol: float = 1e-7) -> np.ndarray | None:
    """Point-to-plane ICP from the identity: T with T·src on the surface sampled by dst. Each iteration pairs every
    source point with its nearest destination point, keeps the pairs closer than `max_pair_m` (parts one cloud
    has and the other lacks must not drag the fit) and solves the linearised least squares of the distances
    along the destination normals. Point-to-plane rather than point-to-point: the points of a room lie on floor
    and walls, where dense point-to-point pairs pull almost nothing and the fit stalls short of the offset. A
    fixed distance cut rather than a multiple of the median: most pairs sit on surfaces sliding along
    themselves, and a median-based cut would drop exactly the pairs on the few surfaces that pin the offset.
    None when fewer than `min_pairs` pairs are left."""
    from scipy.spatial import cKDTree

    if len(src) < min_pairs or len(dst) < min_pairs:
        return None
    tree = cKDTree(dst)
    normals = surface_normals(dst)
    T = np.eye(4)
    for _ in range(iterations):
        moved = src @ T[:3, :3].T + T[:3, 3]
        dist, idx = tree.query(moved, k=1, distance_upper_bound=max_pair_m)
        keep = np.isfinite(dist)
        if int(keep.sum()) < min_pairs:
            return None
        p, q, n = moved[keep], dst[idx[keep]], normals[idx[keep]]
        A = np.concatenate([np.cross(p, n), n], 1)  # d/d(ω, t) of (R p + t − q)·n at R = I, t = 0
        b = -((p - q) * n).sum(1)
        x = np.linalg.lstsq(A, b, rcond=None)[0]  # minimum-norm along directions nothing constrains
        step = np.eye(4)
        step[:3, :3], step[:3, 3] = rotation(x[:3]), x[3:]
        T = step @ T
        if float(np.linalg.norm(x)) < tol:
            break
    return T


@dataclass
class GeometricPoseEstimator:
    """ICP of the query's surface onto the reference's, each in its own camera frame (View.surface_points: a voxel
    render's visible voxel centres, a condition's unprojected depth)."""

    iterations: int = 30
    max_points: int = 8192
    max_pair_m: float = 0.5
    name: str = "geometric"
    needs_rgb: bool = False

    def relative_pose(self, reference: View, query: View) -> np.ndarray | None:
        # T maps query-camera points onto the same surface in reference-camera coordinates: the query's pose there.
        src = even_subset(query.surface_points(), self.max_points)
        dst = even_subset(reference.surface_points(), self.max_points)
        return icp(src, dst, self.iterations, self.max_pair_m)


class VGGTPoseEstimator:
    """VGGT (Wang et al. 2025) on [reference RGB, query RGB]: its camera head's pose encodings give both cameras in
    the first camera's frame (OpenCV camera-from-world extrinsics), up to VGGT's scene normalisation; the
    translation is brought to metres by the median ratio of the reference's depth to VGGT's depth of it."""

    name = "vggt"
    needs_rgb = True
    patch = 14  # VGGT's ViT patch: image sides must be multiples of it
    width = 518  # the width VGGT was trained at (its load_and_preprocess_images)

    def __init__(self, model: torch.nn.Module, pose_encoding_to_extri_intri: Any, device: torch.device | str):
        self.model = model.eval().requires_grad_(False).to(device)
        self.decode = pose_encoding_to_extri_intri
        self.device = torch.device(device)

    def _images(self, views: list[View]) -> torch.Tensor:
        import torch.nn.functional as F

        h, w = views[0].size
        height = max(self.patch, round(h * self.width / w / self.patch) * self.patch)
        images = []
        for v in views:
            if v.rgb is None:
                raise ValueError("the vggt pose estimator needs RGB images of both views")
            images.append(torch.from_numpy(np.ascontiguousarray(v.rgb, np.float32)).permute(2, 0, 1))
        # [S, 3, H, W] in [0, 1], VGGT's documented input.
        return F.interpolate(torch.stack(images), size=(height, self.width), mode="bilinear", align_corners=False,
                             antialias=True).clamp(0, 1)

    @torch.no_grad()
    def relative_pose(self, reference: View, query: View) -> np.ndarray | None:
        valid = reference.depth > 0
        if not valid.any():
            return None
        images = self._images([reference, query]).to(self.device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.device.type == "cuda"):
            pred = self.model(images)
        extrinsic, _ = self.decode(pred["pose_enc"].float(), images.shape[-2:])  # [1, S, 3, 4] camera from world
        E = np.tile(np.eye(4), (2, 1, 1))
        E[:, :3, :] = extrinsic[0].double().cpu().numpy()
        T = E[0] @ np.linalg.inv(E[1])  # query camera → world → reference camera
        # Metric scale: the reference depth (nearest pixel) over VGGT's depth of the reference view.
        pred_depth = pred["depth"][0, 0, ..., 0].float().cpu().numpy()
        ph, pw = pred_depth.shape
        h, w = reference.size
        rows = np.minimum(((np.arange(ph) + 0.5) * h / ph).astype(np.int64), h - 1)
        cols = np.minimum(((np.arange(pw) + 0.5) * w / pw).astype(np.int64), w - 1)
        ref_depth = reference.depth[rows][:, cols]
        both = (ref_depth > 0) & (pred_depth > 1e-6)
        if not both.any():
            return None
        T[:3, 3] *= float(np.median(ref_depth[both] / pred_depth[both]))
        return T


# ------------------------------------------------------------------------------------------------ loading
def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def load_vggt(config: RLConfig, device: torch.device | str) -> VGGTPoseEstimator:
    """The VGGT pose estimator of `config`, or one UserError sentence saying what is missing (never a fallback to
    another estimator: rewards from a different estimator are a different experiment)."""
    try:
        from vggt.models.vggt import VGGT
        from vggt.utils.pose_enc import pose_encoding_to_extri_intri
    except ImportError as exc:
        raise UserError(
            f"rl.pose_estimator is vggt but the vggt package cannot be imported here ({exc}); install it with "
            f"`{VGGT_INSTALL}` (it is on neither PyPI nor transformers) or set rl.pose_estimator: geometric."
        ) from exc
    if config.vggt_random_init:
        log.warning("rl.vggt_random_init is true: VGGT has random weights (tests only; its poses mean nothing)")
        return VGGTPoseEstimator(VGGT(), pose_encoding_to_extri_intri, device)
    source = config.resolved_vggt_model
    path = Path(source).expanduser()
    # A hub id is exactly "owner/name"; anything else (or anything on disk) is a local directory.
    local = path.exists() or source.startswith(("/", ".", "~")) or source.count("/") != 1
    if local and not path.is_dir():
        raise UserError(f"rl.vggt_model: the local directory {source!r} does not exist; put the VGGT weights "
                        "(config.json and model.safetensors of facebook/VGGT-1B) there or point rl.vggt_model at "
                        "the directory that holds them.")
    offline = local or _hub_offline()
    try:
        model = VGGT.from_pretrained(str(path) if local else source, local_files_only=offline)
    except (OSError, ValueError) as exc:  # huggingface_hub's missing-file errors are both
        where = ("could not be loaded from that directory" if local else
                 "are not in the local Hugging Face cache and cannot be downloaded here" if offline else
                 "could not be downloaded")
        raise UserError(f"rl.vggt_model: VGGT weights {source!r} {where} ({type(exc).__name__}); download them "
                        f"ahead of time (`hf download {source}`) or set rl.vggt_model to a local directory holding "
                        "them.") from exc
    return VGGTPoseEstimator(model, pose_encoding_to_extri_intri, device)


def load_pose_estimator(config: RLConfig, device: torch.device | str | None = None) -> PoseEstimator:
    """`config.pose_estimator`'s estimator (VGGT on `device`, by default CUDA when there is one)."""
    if config.pose_estimator == "vggt":
        return load_vggt(config, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    p = config.reward_params
    return GeometricPoseEstimator(p.icp_iterations, p.max_points, p.icp_max_pair_m)
