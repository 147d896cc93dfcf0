"""The stages' 3D previews in the data stage's terms: voxel scenes with this project's classes, palette and
cameras as viewer panes (interiorfusion_core.viewer), and one call that writes and logs a page.

    pane = scene_pane("ground truth", coords, labels, origin, voxel_size, materials=feats,
                      camera=sample_camera(sample, 0))
    publish_scenes(ctx, "scenes", [pane, ...], title="data · val")   # viewers/scenes.html + MLflow artifact
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from interiorfusion_core.viewer import ConditionCamera, ViewerPane, class_palette, stage_viewer, viewer_html, voxel_glb
from interiorfusion_data.format import png_bytes
from interiorfusion_data.preview import PALETTE
from interiorfusion_data.scene import CLASSES

PAGE_PALETTE = class_palette(PALETTE, CLASSES)


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def camera(pose: Any, K: Any, image: Any) -> ConditionCamera:
    """A condition camera from its pose (camera-to-world, OpenCV axes), intrinsics and image: HxWx3 uint8, or
    3xHxW floats in [0, 1] (a model batch's layout)."""
    img = _numpy(image)
    if img.ndim == 3 and img.shape[0] == 3 and img.shape[-1] != 3:
        img = img.transpose(1, 2, 0)
    if img.dtype != np.uint8:
        img = (np.clip(img.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    h, w = img.shape[:2]
    return ConditionCamera(_numpy(pose).astype(np.float64), _numpy(K).astype(np.float64), w, h, png_bytes(img))


def batch_camera(batch: Mapping[str, Any], b: int) -> ConditionCamera:
    """Item b's condition view of a model batch (`cam_to_world`, `intrinsics`, `rgb` 3×H×W) as a camera."""
    return camera(batch["cam_to_world"][b], batch["intrinsics"][b], batch["rgb"][b])


def sample_camera(sample: Mapping[str, Any], view: int = 0) -> ConditionCamera | None:
    """View `view` of a decoded sample (format.decode_sample with views) as a condition camera; None without."""
    if "rgb" not in sample or len(sample["rgb"]) <= view:
        return None
    return camera(sample["cam_to_world"][view], sample["intrinsics"][view], sample["rgb"][view])


def scene_pane(label: str, coords: Any, classes: Any, origin: Any, voxel_size: float, *,
               materials: Any | None = None, camera: ConditionCamera | None = None,
               metrics: Mapping[str, float | str] | None = None) -> ViewerPane:
    """A pane of voxels [V, 3] (a batch column first is dropped), their class ids [V] and optional materials
    [V, ≥5] (albedo RGB, metallic, roughness)."""
    coords = _numpy(coords)
    if coords.ndim == 2 and coords.shape[1] == 4:
        coords = coords[:, 1:]
    glb = voxel_glb(coords, _numpy(origin).astype(np.float64), float(voxel_size), _numpy(classes), PALETTE, CLASSES,
                    materials=None if materials is None else _numpy(materials))
    return ViewerPane(label, glb, camera, dict(metrics or {}))


def sample_pane(sample: Mapping[str, Any], label: str, *, view: int = 0,
                metrics: Mapping[str, float | str] | None = None) -> ViewerPane:
    """A decoded sample (with voxels) as a pane: its voxels, classes, measured materials and condition view."""
    return scene_pane(label, sample["coords"], sample["labels"], sample["origin"], float(sample["voxel_size"]),
                      materials=sample["feats"], camera=sample_camera(sample, view), metrics=metrics)


def scenes_html(panes: Sequence[ViewerPane], title: str = "") -> str:
    return viewer_html(panes, title=title, palette=PAGE_PALETTE)


def publish_scenes(ctx: Any, name: str, panes: Sequence[ViewerPane], title: str = "", *, to_output: bool = True
                   ) -> str | None:
    """Write `viewers/<name>.html` under the stage output (unless `to_output=False`) and log it to the stage's
    MLflow run (main rank; `ctx` is a StageContext or anything with `is_main`, `output` and `tracker`)."""
    return stage_viewer(ctx, name, panes, title=title, palette=PAGE_PALETTE, to_output=to_output)
