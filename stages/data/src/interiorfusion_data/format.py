"""Scene sample format `interiorfusion.scene/2` (documented in docs/data-format.md); version-1 samples decode too.

A sample is a set of named members, stored in a shard as tar members `{key}.{name}` (the webdataset
convention: everything after the first dot of the basename is the member name). Encoding is deterministic:
the same scene gives the same bytes.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from interiorfusion_data.render import RenderOutput
from interiorfusion_data.scene import CLASSES, UNKNOWN, Camera, Scene
from interiorfusion_data.voxelize import CHANNELS, VoxelGrid, dequantize_attrs, downsample_labeled, quantize_attrs

SAMPLE_FORMAT = "interiorfusion.scene/2"
# Older sample formats the decoder still reads (what they lack is filled in and flagged, see decode_sample).
READABLE_FORMATS = ("interiorfusion.scene/1", SAMPLE_FORMAT)
DATASET_FORMAT = "interiorfusion.dataset/1"
INDEX_FORMAT = "interiorfusion.shard-index/1"
DEPTH_SCALE = 1000.0  # depth PNGs hold millimetres
MAP_NAMES = ("rgb", "depth", "normal", "semantic", "instance")


class SampleError(ValueError):
    """A sample's bytes cannot be decoded (corrupt or truncated)."""


# ---------------------------------------------------------------------------------------------- encoding
def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def png_bytes(arr: np.ndarray, compress_level: int = 1) -> bytes:
    buf = io.BytesIO()
    # uint16 2D arrays become 16-bit greyscale PNGs ("I;16"), uint8 ones L or RGB.
    img = Image.fromarray(np.ascontiguousarray(arr))
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def spatiallm_text(scene: Scene) -> str:
    """Room layout and boxes as SpatialLM-style statements, one per line (metres, radians)."""
    f = lambda v: f"{float(v):.3f}"  # noqa: E731
    lines = []
    for i, w in enumerate(scene.walls):
        lines.append(f"wall_{i}=Wall({','.join(f(v) for v in (*w.a, *w.b, w.height, w.thickness))})")
    for kind, ops in (("door", scene.doors), ("window", scene.windows)):
        for i, o in enumerate(ops):
            lines.append(f"{kind}_{i}={kind.capitalize()}(wall_{o.wall},{','.join(f(v) for v in o.center)},"
                         f"{f(o.width)},{f(o.height)})")
    for i, b in enumerate(scene.objects):
        lines.append(f"bbox_{i}=Bbox({b.label},{','.join(f(v) for v in b.center)},{f(b.yaw)},"
                     f"{','.join(f(v) for v in b.size)})")
    return "\n".join(lines) + "\n"


def layout_json(scene: Scene) -> dict[str, Any]:
    return {
        "walls": [w.to_json() for w in scene.walls],
        "doors": [d.to_json() for d in scene.doors],
        "windows": [w.to_json() for w in scene.windows],
        "objects": [o.to_json() for o in scene.objects],
        "floor_polygon": None if scene.floor_polygon is None else np.round(scene.floor_polygon, 6).tolist(),
    }


@dataclass
class EncodedSample:
    key: str
    members: dict[str, bytes]
    stats: dict[str, float] = field(default_factory=dict)
    index: dict[str, Any] = field(default_factory=dict)  # extra entries of its shard-index record (edit pairs)


def scene_present(scene: Scene) -> dict[str, bool]:
    """What the sample carries beyond geometry: `voxel_labels` when some surface has a class (not "unknown"),
    `voxel_instances` when some surface has an instance id; plus the scene's own flags (real scans:
    `captured_frames`, `materials`, `layout`; a sample without them has no captured frames, has materials and
    has a layout)."""
    return {"voxel_labels": bool((scene.face_class != UNKNOWN).any()),
            "voxel_instances": bool((scene.face_instance != 0).any()), **scene.present}


def encode_sample(key: str, scene: Scene, grids: list[VoxelGrid], cameras: list[Camera],
                  renders: list[RenderOutput], origin: np.ndarray, cube_size: float,
                  png_level: int = 1, lights: np.ndarray | None = None,
                  frame: dict[str, Any] | None = None, edit: dict[str, Any] | None = None) -> EncodedSample:
    """`lights` (L, 4) [x, y, z, intensity], world frame, metres: the point lights the RGB views were shaded
    with (shading.shade_np), stored as meta `lights`; None for a sample whose colours were not shaded by it.
    `frame`: the voxel frame (frame.VoxelFrame.to_meta), stored as meta `frame`; `edit`: what an edited scene's
    edit was (edits.py: `of` the original's key, `kind`, `instance`, `class`, `boxes`), stored as meta `edit`."""
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
    if any(g.labels is None or g.instances is None for g in grids):
        raise ValueError(f"sample {key}: every voxel grid needs labels and instances ({SAMPLE_FORMAT})")
    members: dict[str, bytes] = {}
    res = [g.resolution for g in grids]
    meta = {
        "format": SAMPLE_FORMAT, "key": key,
        "origin": [round(float(v), 9) for v in origin], "cube_size": round(float(cube_size), 9),
        "resolutions": res, "voxel_size": {str(g.resolution): g.voxel_size for g in grids},
        "num_voxels": {str(g.resolution): len(g) for g in grids},
        "channels": list(CHANNELS), "views": len(cameras),
        "image_size": [cameras[0].width, cameras[0].height] if cameras else None,
        "depth": {"kind": "z", "unit": "mm", "scale": DEPTH_SCALE, "invalid": 0},
        "normal_frame": "camera_opencv",
        "num_classes": len(CLASSES),
        "present": {**scene_present(scene), "lights": lights is not None},
        "scene": {k: v for k, v in scene.meta.items() if isinstance(v, str | int | float | bool)},
    }
    if lights is not None:
        # Exact float64 values (JSON round-trips them): the renderer shaded with these, cast to float32.
        meta["lights"] = [[float(v) for v in light] for light in np.asarray(lights, np.float64).reshape(-1, 4)]
    if frame is not None:
        meta["frame"] = frame  # the voxel frame (frame.VoxelFrame.to_meta): kind, up, floor_z, floor_height
    if edit is not None:
        meta["edit"] = edit
    members["meta.json"] = json_bytes(meta)
    members["layout.json"] = json_bytes(layout_json(scene))
    members["layout.txt"] = spatiallm_text(scene).encode()
    for g in grids:
        members[f"occ{g.resolution}.coords.npy"] = npy_bytes(g.coords.astype(np.uint16))
        members[f"occ{g.resolution}.attrs.npy"] = npy_bytes(quantize_attrs(g.attrs))
        members[f"occ{g.resolution}.labels.npy"] = npy_bytes(g.labels.astype(np.int16))
        members[f"occ{g.resolution}.instances.npy"] = npy_bytes(g.instances.astype(np.int32))
    if cameras:
        members["cam.intrinsics.npy"] = npy_bytes(np.stack([c.K for c in cameras]).astype(np.float32))
        members["cam.poses.npy"] = npy_bytes(np.stack([c.pose for c in cameras]).astype(np.float32))
    for i, r in enumerate(renders):
        members[f"view{i}.rgb.png"] = png_bytes(r.rgb, png_level)
        depth_mm = np.clip(np.round(r.depth * DEPTH_SCALE), 0, 65535).astype(np.uint16)
        members[f"view{i}.depth.png"] = png_bytes(depth_mm, png_level)
        members[f"view{i}.normal.png"] = png_bytes(
            np.clip(np.round((r.normal + 1.0) * 127.5), 0, 255).astype(np.uint8), png_level)
        members[f"view{i}.semantic.png"] = png_bytes(r.semantic.astype(np.uint8), png_level)
        members[f"view{i}.instance.png"] = png_bytes(r.instance.astype(np.uint16), png_level)
    stats = {f"voxels_{g.resolution}": float(len(g)) for g in grids}
    stats["objects"] = float(len(scene.objects))
    stats["bytes"] = float(sum(len(b) for b in members.values()))
    return EncodedSample(key, members, stats)


# ---------------------------------------------------------------------------------------------- decoding
def load_npy(data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise SampleError(f"bad .npy member ({exc})") from None


def load_png(data: bytes) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            arr = np.array(img)
    except Exception as exc:
        raise SampleError(f"bad .png member ({exc})") from None
    return arr


def load_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise SampleError(f"bad .json member ({exc})") from None


def _member(members: dict[str, bytes], name: str) -> bytes:
    if name not in members:
        raise SampleError(f"missing member '{name}'")
    return members[name]


def voxels_at(members: dict[str, bytes], meta: dict[str, Any], resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Coords (M, 3) int32 and float attrs (M, 8) at `resolution`: a stored level, or exactly downsampled from
    the nearest finer stored level (parent occupied iff any child is; attributes = mean of the children)."""
    coords, attrs, _, _ = labeled_voxels_at(members, meta, resolution)
    return coords, attrs


def labeled_voxels_at(members: dict[str, bytes], meta: dict[str, Any], resolution: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`voxels_at` plus labels (M,) int16 and instances (M,) int32 (majority of the children when downsampled).
    A version-1 sample has none stored: labels are "unknown" and instances 0 (meta `present` says so)."""
    stored = sorted(int(r) for r in meta["resolutions"])
    if resolution in stored:
        src = resolution
    else:
        finer = [r for r in stored if r > resolution and r % resolution == 0]
        if not finer:
            raise SampleError(f"resolution {resolution} is not stored and no finer level divides into it "
                              f"(stored: {stored})")
        src = finer[0]
    coords = load_npy(_member(members, f"occ{src}.coords.npy"))
    attrs = dequantize_attrs(load_npy(_member(members, f"occ{src}.attrs.npy")))
    if coords.ndim != 2 or coords.shape[1] != 3 or attrs.shape != (len(coords), len(CHANNELS)):
        raise SampleError(f"occupancy arrays at {src} have inconsistent shapes {coords.shape} / {attrs.shape}")
    if meta.get("format") == SAMPLE_FORMAT:
        labels = load_npy(_member(members, f"occ{src}.labels.npy"))
        instances = load_npy(_member(members, f"occ{src}.instances.npy"))
        if labels.shape != (len(coords),) or instances.shape != (len(coords),):
            raise SampleError(f"label arrays at {src} have shapes {labels.shape} / {instances.shape}, "
                              f"expected ({len(coords)},)")
    else:
        labels = np.full(len(coords), UNKNOWN, np.int16)
        instances = np.zeros(len(coords), np.int32)
    if src != resolution:
        coords, attrs, labels, instances = downsample_labeled(coords.astype(np.int32), attrs, src // resolution,
                                                              labels, instances)
    return coords.astype(np.int32), attrs, labels.astype(np.int16), instances.astype(np.int32)


def sample_present(meta: dict[str, Any]) -> dict[str, bool]:
    """The sample's `present` flags; a version-1 sample has no voxel labels. `lights` is true when meta stores the
    shading lights (samples written before lights were stored have none, and they cannot be recomputed without
    the scene)."""
    present = meta.get("present")
    out = ({k: bool(v) for k, v in present.items()} if isinstance(present, dict)
           else {"voxel_labels": False, "voxel_instances": False})
    out["lights"] = bool(out.get("lights", True)) and isinstance(meta.get("lights"), list)
    return out


def sample_lights(meta: dict[str, Any]) -> np.ndarray:
    """The stored shading lights (L, 4) float32 [x, y, z, intensity] (world frame, metres); (0, 4) when absent."""
    lights = meta.get("lights")
    if not isinstance(lights, list):
        return np.zeros((0, 4), np.float32)
    arr = np.asarray(lights, np.float64)
    if arr.size and (arr.ndim != 2 or arr.shape[1] != 4):
        raise SampleError(f"meta.json: lights have shape {arr.shape}, expected (L, 4)")
    return arr.reshape(-1, 4).astype(np.float32)


def pick_views(total: int, views: list[int] | int | None, view_seed: tuple[int, ...] | None = None) -> list[int]:
    """Which views to decode: all (None), the listed ones, or K of them — the first K, or K drawn from
    `view_seed` (deterministic). Scans can hold fewer views than asked for: then all of them."""
    if views is None:
        return list(range(total))
    if isinstance(views, int):
        k = min(views, total)
        if view_seed is None:
            return list(range(k))
        rng = np.random.default_rng(np.random.SeedSequence(list(view_seed)))
        return sorted(rng.choice(total, size=k, replace=False).tolist())
    bad = [i for i in views if not 0 <= i < total]
    if bad:
        raise SampleError(f"views {bad} requested but the sample has {total}")
    return list(views)


def decode_sample(members: dict[str, bytes], resolution: int | None = None, fields: tuple[str, ...] = (
        "voxels", "views", "layout"), views: list[int] | int | None = None,
        view_seed: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Decode the members of one sample into numpy arrays and dicts.

    Returns `key`, `meta`, `present` (what the sample carries: `voxel_labels`, `voxel_instances`, `lights`),
    `lights` (L, 4) float32 [x, y, z, intensity] world frame (0 rows when absent), and per field:
    voxels → `coords` (M, 3) int32, `feats` (M, 8) float32, `labels` (M,) int16 class ids, `instances` (M,) int32,
    `resolution`, `origin` (3,), `voxel_size`; views → `rgb` (V, H, W, 3) uint8, `depth` (V, H, W) float32
    metres (z-depth, 0 = none), `normal` (V, H, W, 3) float32 camera frame, `semantic` (V, H, W) int64,
    `instance` (V, H, W) int64, `intrinsics` (V, 3, 3), `cam_to_world` (V, 4, 4); layout → `layout` (dict),
    `layout_text`, `boxes` (K, 8) float32 [cx, cy, cz, sx, sy, sz, yaw, class_id].
    """
    meta = load_json(_member(members, "meta.json"))
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise SampleError(f"meta.json: format {found!r} is not one this reader knows ({', '.join(READABLE_FORMATS)})")
    out: dict[str, Any] = {"key": meta["key"], "meta": meta, "present": sample_present(meta),
                           "lights": sample_lights(meta)}
    if "voxels" in fields:
        res = int(resolution if resolution is not None else max(meta["resolutions"]))
        coords, feats, labels, instances = labeled_voxels_at(members, meta, res)
        out.update(coords=coords, feats=feats, labels=labels, instances=instances, resolution=res,
                   origin=np.asarray(meta["origin"], np.float32),
                   voxel_size=np.float32(meta["cube_size"] / res))
    if "views" in fields and meta.get("views"):
        idx = pick_views(int(meta["views"]), views, view_seed)
        K = load_npy(_member(members, "cam.intrinsics.npy"))
        P = load_npy(_member(members, "cam.poses.npy"))
        maps: dict[str, list[np.ndarray]] = {m: [] for m in MAP_NAMES}
        for i in idx:
            for m in MAP_NAMES:
                maps[m].append(load_png(_member(members, f"view{i}.{m}.png")))
        try:
            out["rgb"] = np.stack(maps["rgb"]).astype(np.uint8)
            out["depth"] = np.stack(maps["depth"]).astype(np.float32) / DEPTH_SCALE
            normal = np.stack(maps["normal"]).astype(np.float32) / 127.5 - 1.0
            normal[out["depth"] == 0] = 0.0
            out["normal"] = normal
            out["semantic"] = np.stack(maps["semantic"]).astype(np.int64)
            out["instance"] = np.stack(maps["instance"]).astype(np.int64)
        except ValueError as exc:
            raise SampleError(f"view maps disagree in shape ({exc})") from None
        out["intrinsics"] = K[idx].astype(np.float32)
        out["cam_to_world"] = P[idx].astype(np.float32)
    if "layout" in fields:
        layout = load_json(_member(members, "layout.json"))
        out["layout"] = layout
        out["layout_text"] = _member(members, "layout.txt").decode()
        out["boxes"] = np.array(
            [[*o["center"], *o["size"], o["yaw"], o["class_id"]] for o in layout["objects"]], np.float32
        ).reshape(-1, 8)
    return out
