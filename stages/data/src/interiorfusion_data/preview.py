"""Contact sheets: per sample one row of RGB, depth, semantic classes, normals, and two dollhouse voxel views:
materials, and per-voxel classes in the semantic map's palette."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from interiorfusion_data.scene import CLASSES

# Distinct colours per class id (0 = void is black).
PALETTE = np.array([
    (0, 0, 0), (174, 199, 232), (152, 223, 138), (200, 200, 200), (140, 86, 75), (23, 190, 207),
    (255, 127, 14), (197, 176, 213), (214, 39, 40), (31, 119, 180), (188, 189, 34), (148, 103, 189),
    (227, 119, 194), (82, 84, 163), (247, 182, 210), (255, 187, 120), (44, 160, 44), (112, 128, 144),
    (219, 219, 141), (120, 120, 120),
    # counter, curtain, refrigerator, shower_curtain, toilet, sink, bathtub, unknown
    (178, 76, 76), (255, 152, 150), (158, 218, 229), (100, 85, 144), (57, 59, 121), (112, 220, 200),
    (227, 227, 80), (64, 64, 64),
], np.uint8)
assert len(PALETTE) == len(CLASSES)
_STOPS = np.array([(13, 8, 135), (126, 3, 168), (204, 71, 120), (248, 149, 64), (240, 249, 33)], np.float64)


def colorize_depth(depth: np.ndarray) -> np.ndarray:
    valid = depth > 0
    out = np.zeros((*depth.shape, 3), np.uint8)
    if not valid.any():
        return out
    lo, hi = np.percentile(depth[valid], [1, 99])
    t = np.clip((depth - lo) / max(hi - lo, 1e-6), 0, 1) * (len(_STOPS) - 1)
    i = np.minimum(t.astype(int), len(_STOPS) - 2)
    f = (t - i)[..., None]
    col = _STOPS[i] * (1 - f) + _STOPS[i + 1] * f
    out[valid] = col[valid].astype(np.uint8)
    return out


def colorize_semantic(sem: np.ndarray) -> np.ndarray:
    return PALETTE[np.clip(sem, 0, len(PALETTE) - 1)]


def colorize_normal(normal: np.ndarray) -> np.ndarray:
    return np.clip((normal + 1) * 127.5, 0, 255).astype(np.uint8)


def voxel_view(coords: np.ndarray, feats: np.ndarray, size: int, colors: np.ndarray | None = None) -> np.ndarray:
    """Orthographic dollhouse view from above a corner; voxels facing away (near walls, ceiling) are culled by
    their stored normal, so the room reads from outside. Coloured by albedo, or by `colors` (M, 3) in [0, 1]."""
    img = np.full((size, size, 3), 255, np.uint8)
    if not len(coords):
        return img
    view = np.array([1.0, 1.0, -1.3])
    view /= np.linalg.norm(view)
    right = np.array([1.0, -1.0, 0.0]) / np.sqrt(2)
    up = np.cross(right, view)
    n = feats[:, 5:8]
    keep = (n @ -view) > 0.05
    c, f = coords[keep].astype(np.float64), feats[keep]
    base = (f[:, :3] if colors is None else np.asarray(colors, np.float64)[keep])
    if not len(c):
        return img
    sx, sy, depth = c @ right, c @ up, c @ view
    span = max(sx.max() - sx.min(), sy.max() - sy.min()) + 1
    scale = (size - 8) / span
    px = ((sx - sx.min()) * scale + 4).astype(int)
    py = ((sy.max() - sy) * scale + 4).astype(int)
    light = np.array([-0.4, -0.6, 0.7])
    light /= np.linalg.norm(light)
    shade = 0.55 + 0.45 * np.clip(f[:, 5:8] @ light, 0, 1)
    col = np.clip(base * shade[:, None] * 255, 0, 255).astype(np.uint8)
    # Painter's order: far first, so nearer voxels overwrite.
    order = np.argsort(-depth, kind="stable")
    s = max(1, int(np.ceil(scale)))
    for dy in range(s):
        for dx in range(s):
            x, y = np.clip(px[order] + dx, 0, size - 1), np.clip(py[order] + dy, 0, size - 1)
            img[y, x] = col[order]
    return img


def _tile(arr: np.ndarray, size: int) -> Image.Image:
    return Image.fromarray(arr).resize((size, size), Image.NEAREST)


def contact_sheet(samples: list[dict[str, Any]], tile: int = 160) -> Image.Image:
    """One row per decoded sample (see format.decode_sample): RGB, depth, semantic, normal of view 0, voxels by
    material, voxels by class (the semantic palette; "no labels" where the sample has none)."""
    cols = ("rgb", "depth", "semantic", "normal", "voxels", "voxel classes")
    head = 18
    sheet = Image.new("RGB", (tile * len(cols), head + tile * max(1, len(samples))), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(cols):
        draw.text((j * tile + 4, 3), name, fill=(0, 0, 0))
    for i, s in enumerate(samples):
        y = head + i * tile
        tiles: list[np.ndarray] = []
        if "rgb" in s and len(s["rgb"]):
            tiles += [s["rgb"][0], colorize_depth(s["depth"][0]), colorize_semantic(s["semantic"][0]),
                      colorize_normal(s["normal"][0])]
        else:
            tiles += [np.full((8, 8, 3), 230, np.uint8)] * 4
        if "coords" in s:
            tiles.append(voxel_view(s["coords"], s["feats"], tile))
            if "labels" in s:
                tiles.append(voxel_view(s["coords"], s["feats"], tile, colorize_semantic(s["labels"]) / 255.0))
        for j, t in enumerate(tiles):
            sheet.paste(_tile(t, tile), (j * tile, y))
        if "labels" in s and not s.get("present", {}).get("voxel_labels", True):
            draw.text((5 * tile + 4, y + 4), "no labels", fill=(200, 0, 0))
        label = f"{s['key']} @{s.get('resolution', '')}"
        draw.text((4, y + tile - 14), label, fill=(255, 255, 255))
    return sheet


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def preview_dataset(uri: Any, split: str = "train", count: int = 4, resolution: int | None = None,
                    require_manifest: bool = False) -> Image.Image:
    from interiorfusion_data.format import SampleError
    from interiorfusion_data.loader import open_dataset

    ds = open_dataset(uri, split, require_manifest=require_manifest)
    samples = []
    for i in range(min(count, len(ds))):
        try:
            samples.append(ds.get(i, resolution))
        except SampleError:
            continue
    return contact_sheet(samples)
