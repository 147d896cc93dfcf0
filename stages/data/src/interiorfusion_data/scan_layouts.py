"""Any Scene written in a scan dataset's own on-disk layout: ScanNet's extracted scans and HM3D's habitat scenes.

The files are what the real datasets ship (names, formats, frames, the label files), so the real importers
(importers.py) read them back; the data stage's `importer.simulate` uses this to make "InteriorFusion-Real"
instances of simulated scans for smoke runs and tests, where no dataset is at hand.

- **ScanNet** (`write_scannet_scan`): `SCENE/SCENE_vh_clean_2.ply` (the mesh in the raw scan frame, vertex
  colours), `SCENE_vh_clean_2.0.010000.segs.json` (a segment per vertex), `SCENE.aggregation.json` (objects as
  groups of segments, raw-category labels), `SCENE.txt` (`axisAlignment`, the two cameras' sizes and intrinsics,
  `sceneType`), and the frames as ScanNet's `reader.py` exports them: `color/ID.jpg`, `depth/ID.png` (uint16
  millimetres), `pose/ID.txt` (camera-to-world in the raw frame; `-inf` where tracking was lost) and
  `intrinsic/{intrinsic,extrinsic}_{color,depth}.txt`. Colour and depth are rendered by the project's renderer
  at the given poses through two cameras with their own sizes and intrinsics (ScanNet's colour and depth
  cameras' fields of view, `scannet_sensor`), optionally with depth noise and holes.
- **HM3D** (`write_hm3d_scene`): `NNNNN-HASH/HASH.basis.glb` (y-up glTF, vertex colours), `HASH.semantic.glb`
  (the same mesh, each object's faces in its own colour) and `HASH.semantic.txt` (`id,HEX,"name",region`).

Meshes are written unwelded (three vertices per face), so a face's vertex colours are its own albedo and every
vertex belongs to one object. Labels are written as raw category names (`raw_label`: ScanNet's "couch",
"bookshelf", …), so importing them exercises the label mapping too. An object is a face's (instance, class): its
ScanNet objectId is instance − 1 and its HM3D id the instance, so instance ids come back as they were; faces of
class "unknown" are left unannotated.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import trimesh

from interiorfusion_data.render import place_cameras, render
from interiorfusion_data.scene import CLASSES, UNKNOWN, Camera, Scene

if TYPE_CHECKING:
    from interiorfusion_data.config import SimulateSection
    from interiorfusion_data.procedural import ProceduralOptions

# Raw category names for our classes where the datasets' annotators use another word (map_label maps them back).
RAW_LABELS = {"sofa": "couch", "shelf": "bookshelf", "other": "object", "tv": "tv", "counter": "kitchen counter"}
# ScanNet's `sceneType` for the generator's archetypes.
SCANNET_SCENE_TYPES = {"bedroom": "Bedroom / Hotel", "living_room": "Living room / Lounge",
                       "dining_room": "Dining Room", "office": "Office"}
# ScanNet's cameras at full size: width, height, fx, fy, cx, cy (scene0000_00's intrinsics; the colour camera
# sees 58° × 45°, the depth camera 59° × 46°).
SCANNET_COLOR = (1296, 968, 1170.187988, 1170.187988, 647.75, 483.75)
SCANNET_DEPTH = (640, 480, 571.623718, 571.623718, 319.5, 239.5)
SEGMENT_FACES = 64  # ScanNet over-segments its meshes: objects are written as segments of up to this many faces


def raw_label(cls: str) -> str:
    return RAW_LABELS.get(cls, cls.replace("_", " "))


@dataclass(frozen=True)
class SensorCamera:
    """A scan camera: image size and pinhole intrinsics (OpenCV, pixel centres at u + 0.5)."""

    width: int
    height: int
    K: np.ndarray

    def at(self, pose: np.ndarray) -> Camera:
        return Camera(self.K, pose, self.width, self.height)


def scannet_sensor(which: str, width: int, height: int) -> SensorCamera:
    """ScanNet's colour or depth camera (`which`) resized to `width`×`height`: the same fields of view."""
    w0, h0, fx, fy, cx, cy = SCANNET_COLOR if which == "color" else SCANNET_DEPTH
    sx, sy = width / w0, height / h0
    K = np.array([[fx * sx, 0.0, (cx + 0.5) * sx - 0.5], [0.0, fy * sy, (cy + 0.5) * sy - 0.5], [0.0, 0.0, 1.0]])
    return SensorCamera(width, height, K)


def scene_objects(scene: Scene) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Per face its object number (-1: unannotated) and per object (id, class): the id is the instance where
    that instance has one class (0-based objects are instance − 1 for ScanNet), fresh ids after the largest
    instance otherwise (a labelled face without instance, an instance of two classes)."""
    pairs = np.stack([scene.face_instance.astype(np.int64), scene.face_class.astype(np.int64)], axis=1)
    uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    classes_of: dict[int, int] = {}
    for inst, _ in uniq.tolist():
        classes_of[inst] = classes_of.get(inst, 0) + 1
    next_id = int(scene.face_instance.max(initial=0)) + 1
    objects: list[tuple[int, str]] = []
    number = np.full(len(uniq), -1, np.int64)
    for k, (inst, cls) in enumerate(uniq.tolist()):
        if cls == UNKNOWN:
            continue
        if inst > 0 and classes_of[inst] == 1:
            oid = inst
        else:
            oid, next_id = next_id, next_id + 1
        number[k] = len(objects)
        objects.append((oid, CLASSES[cls]))
    return number[inverse], objects


def _unwelded(scene: Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertices (3F, 3), faces (F, 3) and vertex colours (3F, 4) uint8 of the scene with no shared vertex."""
    verts = scene.vertices[scene.faces].reshape(-1, 3)
    faces = np.arange(len(verts), dtype=np.int64).reshape(-1, 3)
    rgb = np.clip(np.round(scene.face_material[:, :3].astype(np.float64) * 255), 0, 255).astype(np.uint8)
    colours = np.concatenate([np.repeat(rgb, 3, axis=0), np.full((len(verts), 1), 255, np.uint8)], axis=1)
    return verts, faces, colours


def _ply(path: Path, verts: np.ndarray, faces: np.ndarray, colours: np.ndarray) -> None:
    mesh = trimesh.Trimesh(verts, faces, process=False)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=colours)
    mesh.export(path)


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _floored(scene: Scene) -> Scene:
    """The scene with a floor polygon for camera placement (its bounding box's where it has none)."""
    if scene.floor_polygon is not None:
        return scene
    lo, hi = scene.bounds()
    return replace(scene, floor_polygon=np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]]))


def scan_poses(scene: Scene, rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """Camera-to-world poses of a walk through the room: the renderer's inside placement (eye height, clear of
    the furniture and the walls, each looking at a piece of furniture)."""
    return [cam.pose for cam in place_cameras(_floored(scene), rng, count, 64)]


def axis_alignment(rng: np.random.Generator, max_shift: float = 1.0) -> np.ndarray:
    """A ScanNet `axisAlignment`: raw scan frame → aligned frame, a random yaw and horizontal shift."""
    yaw = rng.uniform(-math.pi, math.pi)
    c, s = math.cos(yaw), math.sin(yaw)
    tx, ty = rng.uniform(-max_shift, max_shift, 2)
    return np.array([[c, -s, 0.0, tx], [s, c, 0.0, ty], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def degrade_depth(depth: np.ndarray, rng: np.random.Generator | None, noise: float = 0.0,
                  dropout: float = 0.0) -> np.ndarray:
    """Sensor-like depth: Gaussian noise with std `noise`·z² metres and a `dropout` fraction of pixels set to 0."""
    out = depth.astype(np.float64)
    if noise == 0 and dropout == 0:
        return out
    if rng is None:
        raise ValueError("depth noise and dropout need an rng")
    valid = out > 0
    if noise > 0:
        out = np.where(valid, np.maximum(out + rng.normal(0.0, 1.0, out.shape) * noise * out ** 2, 0.0), 0.0)
    if dropout > 0:
        out[rng.random(out.shape) < dropout] = 0.0
    return out


def _scannet_txt(name: str, align: np.ndarray, color: SensorCamera, depth: SensorCamera, frames: int,
                 scene_type: str) -> str:
    def cam(which: str, s: SensorCamera) -> list[str]:
        return [f"fx_{which} = {s.K[0, 0]:.6f}", f"fy_{which} = {s.K[1, 1]:.6f}", f"mx_{which} = {s.K[0, 2]:.6f}",
                f"my_{which} = {s.K[1, 2]:.6f}"]

    lines = [f"axisAlignment = {' '.join(f'{v:.12g}' for v in align.ravel())}", f"colorHeight = {color.height}",
             f"colorToDepthExtrinsics = {' '.join(f'{v:g}' for v in np.eye(4).ravel())}",
             f"colorWidth = {color.width}", f"depthHeight = {depth.height}", f"depthWidth = {depth.width}",
             *cam("color", color), *cam("depth", depth), f"numColorFrames = {frames}", f"numDepthFrames = {frames}",
             "numIMUmeasurements = 0", f"sceneType = {scene_type}"]
    return "\n".join(sorted(lines, key=lambda line: line.split(" = ")[0])) + "\n"


def write_scannet_scan(
    scene: Scene, root: Path, name: str, poses: Sequence[np.ndarray | None], *,
    color: SensorCamera | None = None, depth: SensorCamera | None = None, align: np.ndarray | None = None,
    depth_noise: float = 0.0, depth_dropout: float = 0.0, rng: np.random.Generator | None = None,
    jpeg_quality: int = 95,
) -> Path:
    """`root/name/` in ScanNet's extracted layout (module docstring) for `scene`, whose frame is the aligned one.

    `poses` are camera-to-world in the scene's frame, one frame each (ids 0, 1, …); None marks a frame whose
    tracking was lost: its pose file holds `-inf` and its images are rendered from the last valid pose before it
    (or the first after it). `align` (default identity) is the `axisAlignment` (raw → aligned): mesh and poses are
    stored in the raw frame, as ScanNet stores them. `color`/`depth` default to ScanNet's cameras at 1/8 size.
    An existing `root/name/` is replaced."""
    color = color or scannet_sensor("color", 162, 121)
    depth = depth or scannet_sensor("depth", 80, 60)
    align = np.eye(4) if align is None else np.asarray(align, np.float64)
    if not any(p is not None for p in poses):
        raise ValueError(f"{name}: needs at least one valid pose")
    out = _fresh_dir(Path(root) / name)
    for sub in ("color", "depth", "pose", "intrinsic"):
        (out / sub).mkdir()
    raw = np.linalg.inv(align)
    verts, faces, colours = _unwelded(scene)
    _ply(out / f"{name}_vh_clean_2.ply", verts @ raw[:3, :3].T + raw[:3, 3], faces, colours)
    # Segments: each object's faces in chunks, numbered over the mesh (unannotated faces get segments of their own).
    number, objects = scene_objects(scene)
    face_seg = np.zeros(len(scene.faces), np.int64)
    groups: dict[int, list[int]] = {}
    seg = 0
    for k in range(-1, len(objects)):
        sel = np.flatnonzero(number == k)
        for start in range(0, len(sel), SEGMENT_FACES):
            face_seg[sel[start:start + SEGMENT_FACES]] = seg
            if k >= 0:
                groups.setdefault(k, []).append(seg)
            seg += 1
    segs_name = f"{name}_vh_clean_2.0.010000.segs.json"
    (out / segs_name).write_text(json.dumps({
        "params": {"kThresh": "0.0001", "segMinVerts": "20", "minPoints": "750", "maxPoints": "30000",
                   "thinThresh": "0.05", "flatThresh": "0.001", "minLength": "0.02", "maxLength": "1"},
        "sceneId": name, "segIndices": np.repeat(face_seg, 3).tolist()}))
    seg_groups = [{"id": oid - 1, "objectId": oid - 1, "segments": groups[k], "label": raw_label(cls)}
                  for k, (oid, cls) in enumerate(objects)]
    (out / f"{name}.aggregation.json").write_text(json.dumps({
        "sceneId": f"scannet.{name}", "appId": "Aggregator.v2", "segGroups": seg_groups,
        "segmentsFile": f"scannet.{segs_name}"}))
    scene_type = SCANNET_SCENE_TYPES.get(str(scene.meta.get("archetype", "")), "Misc.")
    (out / f"{name}.txt").write_text(_scannet_txt(name, align, color, depth, len(poses), scene_type))
    for which, sensor in (("color", color), ("depth", depth)):
        K4 = np.eye(4)
        K4[:3, :3] = sensor.K
        np.savetxt(out / "intrinsic" / f"intrinsic_{which}.txt", K4, fmt="%f")
        np.savetxt(out / "intrinsic" / f"extrinsic_{which}.txt", np.eye(4), fmt="%f")
    from PIL import Image

    normals = scene.face_normals()
    valid = [i for i, p in enumerate(poses) if p is not None]
    for i, pose in enumerate(poses):
        if pose is None:
            np.savetxt(out / "pose" / f"{i}.txt", np.full((4, 4), -np.inf))
            src = max([j for j in valid if j < i], default=valid[0])
            pose = poses[src]
            assert pose is not None
        else:
            np.savetxt(out / "pose" / f"{i}.txt", raw @ pose)  # poses are stored in the raw frame
        col = render(scene, color.at(pose), normals)
        Image.fromarray(col.rgb).save(out / "color" / f"{i}.jpg", quality=jpeg_quality)
        z = degrade_depth(render(scene, depth.at(pose), normals).depth, rng, depth_noise, depth_dropout)
        Image.fromarray(np.clip(np.round(z * 1000), 0, 65535).astype(np.uint16)).save(out / "depth" / f"{i}.png")
    return out


def z_up_to_y_up(v: np.ndarray) -> np.ndarray:
    return np.stack([v[:, 0], v[:, 2], -v[:, 1]], axis=1)


def hm3d_colour(object_id: int) -> int:
    """A distinct 0xRRGGBB per object id (an odd multiplier is a bijection mod 2²⁴; never black for ids < 2²⁴)."""
    return (object_id * 0x9E3779B1) & 0xFFFFFF


def write_hm3d_scene(scene: Scene, root: Path, name: str, region: int = 0) -> Path:
    """`root/name/` in habitat's HM3D layout (module docstring) for `scene`: `name` is `NNNNN-HASH`, the files
    `HASH.*`. The glTF files are y-up, as HM3D's; faces of class "unknown" are black, which names no object. An
    existing `root/name/` is replaced."""
    out = _fresh_dir(Path(root) / name)
    stem = name.split("-", 1)[1] if "-" in name else name
    verts, faces, colours = _unwelded(scene)
    verts = z_up_to_y_up(verts)
    number, objects = scene_objects(scene)
    # Per face its object's colour; unannotated faces (number -1) take the appended black.
    codes = np.array([hm3d_colour(oid) for oid, _ in objects] + [0], np.int64)[number]
    sem = np.stack([codes >> 16, (codes >> 8) & 255, codes & 255, np.full_like(codes, 255)], axis=1)
    for path, vc in ((out / f"{stem}.basis.glb", colours), (out / f"{stem}.semantic.glb",
                                                             np.repeat(sem, 3, axis=0).astype(np.uint8))):
        mesh = trimesh.Trimesh(verts, faces, process=False)
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=vc)
        mesh.export(path)
    rows = [f'{oid},{hm3d_colour(oid):06X},"{raw_label(cls)}",{region}' for oid, cls in objects]
    (out / f"{stem}.semantic.txt").write_text("HM3D Semantic Annotations\n" + "\n".join(rows) + "\n")
    return out


def _hm3d_hash(rng: np.random.Generator) -> str:
    chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(chars[int(i)] for i in rng.integers(0, len(chars), 11))


def simulate_scans(source: str, dest: Path, sim: SimulateSection, opts: ProceduralOptions) -> Path:
    """Write `sim.num_scenes` procedural rooms (`opts`, base seed `sim.seed`) into `dest` in the layout of
    `source` (scannet: `sceneNNNN_00/`, frames at the generator's inside cameras, a random axis alignment; hm3d:
    `NNNNN-HASH/`). The same arguments write the same files. Returns `dest`."""
    from interiorfusion_data.procedural import generate_scene

    dest = _fresh_dir(Path(dest))
    for i in range(sim.num_scenes):
        scene = generate_scene(sim.seed, i, opts)
        # A stream separate from the room's: the capture never shifts the geometry.
        rng = np.random.default_rng(np.random.SeedSequence([int(sim.seed), i, 3]))
        if source == "scannet":
            assert sim.frames and sim.color_size and sim.depth_size
            write_scannet_scan(scene, dest, f"scene{i:04d}_00", scan_poses(scene, rng, sim.frames),
                               color=scannet_sensor("color", *sim.color_size),
                               depth=scannet_sensor("depth", *sim.depth_size), align=axis_alignment(rng),
                               depth_noise=sim.depth_noise or 0.0, depth_dropout=sim.depth_dropout or 0.0, rng=rng)
        elif source == "hm3d":
            write_hm3d_scene(scene, dest, f"{i:05d}-{_hm3d_hash(rng)}")
        else:
            raise ValueError(f"no scan layout for source '{source}'")
    return dest


__all__ = ["RAW_LABELS", "SensorCamera", "axis_alignment", "degrade_depth", "raw_label", "scan_poses",
           "scannet_sensor", "scene_objects", "simulate_scans", "write_hm3d_scene", "write_scannet_scan"]
