"""What `interiorfusion generate` (interiorfusion_material.cli, which textures the room when the pipeline has a
material stage) needs from stage 2: one sample's condition fields from a user's image, depth, layout and camera."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from interiorfusion_core.errors import UserError


def _read_image(path: Path, what: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise UserError(f"--{what} {path}: no such file")
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"--{what} {path}: not an image this reader knows ({exc})") from None


def condition_batch(defaults: dict[str, Any], image: Path, depth: Path | None, layout: Path | None,
                    camera: Path | None, device: str) -> dict[str, Any]:
    """One sample's condition fields, as the structure task's collate would give them."""
    import numpy as np
    import torch

    W, H = defaults["image_size"]
    photo = _read_image(image, "image")
    src_w, src_h = photo.size
    rgb = np.asarray(photo.convert("RGB").resize((W, H)), np.float32) / 255.0
    if depth is not None:
        raw = np.asarray(_read_image(depth, "depth").resize((W, H), 0), np.float32)
        depth_m = raw / 1000.0
    else:
        depth_m = np.zeros((H, W), np.float32)
    if camera is not None:
        try:
            cam = json.loads(camera.read_text())
            K = np.asarray(cam["intrinsics"], np.float64).reshape(3, 3)
            pose = np.asarray(cam["cam_to_world"], np.float64).reshape(4, 4)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"--camera {camera}: expected JSON with intrinsics (3×3) and cam_to_world (4×4) "
                            f"({type(exc).__name__}: {exc})") from None
        K = K.copy()
        K[0] *= W / src_w  # the intrinsics are in --image pixels; the network sees the training image size
        K[1] *= H / src_h
    else:
        cam = defaults["camera"]
        K = np.asarray(cam["intrinsics"], np.float64)
        pose = np.asarray(cam["cam_to_world"], np.float64)
    text = layout.read_text() if layout is not None else ""
    f32 = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32, device=device)  # noqa: E731
    return {
        "keys": [image.stem], "rgb": f32(rgb).permute(2, 0, 1)[None], "depth": f32(depth_m)[None],
        "intrinsics": f32(K)[None], "cam_to_world": f32(pose)[None],
        "origin": torch.zeros(1, 3, device=device), "cube_size": f32([defaults["cube_size"]]),
        "voxel_size": f32([defaults["cube_size"] / defaults["resolution"]]),
        "layout_text": [text], "has_layout": torch.tensor([bool(text.strip())], device=device),
    }
