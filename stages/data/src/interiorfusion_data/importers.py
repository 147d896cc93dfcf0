"""Importers for real data ("InteriorFusion-Real"): a folder of meshes, ScanNet scans, HM3D scenes, 3D-FRONT houses.

Each importer lists its scenes (`items()`, sorted, so the dataset order is stable) and turns one into a Scene
(`load(item)`): z-up metres with per-face class, instance and material, oriented boxes and, where the source
has them, walls/doors/windows and cameras.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import trimesh

from interiorfusion_core.errors import UserError
from interiorfusion_data.scene import (
    CLASS_ID,
    CLASSES,
    Camera,
    ObjectBox,
    Opening,
    Scene,
    SceneBuilder,
    Wall,
)

MESH_EXTS = (".ply", ".obj", ".glb", ".gltf", ".off", ".stl")
DEFAULT_ALBEDO = (0.7, 0.7, 0.7)

# Label words → our classes, checked in order (first match wins): covers ScanNet raw categories, NYU40 names
# and 3D-FRONT furniture categories.
SYNONYMS: list[tuple[str, tuple[str, ...]]] = [
    ("other", ("toilet paper", "paper towel", "soap dispenser", "curtain rod")),
    ("shower_curtain", ("shower curtain",)),
    ("toilet", ("toilet",)),
    ("bathtub", ("bathtub", "bath tub")),
    ("refrigerator", ("refrigerator", "refridgerator", "fridge")),
    ("nightstand", ("nightstand", "night stand", "bedside")),
    ("wardrobe", ("wardrobe", "closet", "armoire")),
    ("shelf", ("bookshelf", "bookcase", "shelf", "shelves", "shelving")),
    ("desk", ("desk",)),
    ("cabinet", ("cabinet", "dresser", "drawer", "sideboard", "tv stand", "console", "cupboard", "chest")),
    ("counter", ("counter", "kitchen island")),
    ("sink", ("sink",)),
    ("bed", ("bed",)),
    ("sofa", ("sofa", "couch", "loveseat", "settee")),
    ("chair", ("chair", "stool", "seat", "bench")),
    ("table", ("table",)),
    ("lamp", ("lamp", "light", "chandelier")),
    ("plant", ("plant", "flower", "vase")),
    ("tv", ("tv", "television", "monitor", "screen")),
    ("picture", ("picture", "painting", "poster", "frame", "art")),
    ("door", ("door",)),
    ("curtain", ("curtain", "drape")),
    ("window", ("window", "blind")),
    ("floor", ("floor", "rug", "carpet")),
    ("ceiling", ("ceiling",)),
    ("wall", ("wall", "column", "pillar")),
]


def map_label(text: str, default: str = "other") -> str:
    """The project class for a label text (first keyword match); `default` when nothing matches ("other" for a
    real label outside the table, "unknown" where the text is only a file name)."""
    t = text.lower().replace("_", " ").replace("-", " ")
    if t.replace(" ", "_") in CLASS_ID and t not in ("void", "unknown"):
        return t.replace(" ", "_")
    for cls, words in SYNONYMS:
        if any(re.search(rf"\b{re.escape(w)}", t) for w in words):
            return cls
    return default


def y_up_to_z_up(v: np.ndarray) -> np.ndarray:
    return np.stack([v[:, 0], -v[:, 2], v[:, 1]], axis=1)


def _face_colors(mesh: trimesh.Trimesh) -> np.ndarray:
    """Per-face albedo in [0, 1] from vertex colours, face colours, a texture or the material's base colour."""
    nf = len(mesh.faces)
    visual = mesh.visual
    try:
        if visual.kind == "texture":
            material = getattr(visual, "material", None)
            if getattr(visual, "uv", None) is not None and _has_image(material):
                visual = visual.to_color()
            else:
                base = _base_color(material)
                return np.tile(np.asarray(base, np.float32), (nf, 1))
        if visual.kind == "vertex":
            vc = np.asarray(visual.vertex_colors, np.float32)[:, :3] / 255.0
            return vc[mesh.faces].mean(axis=1)
        if visual.kind == "face":
            return np.asarray(visual.face_colors, np.float32)[:, :3] / 255.0
    except Exception:
        pass
    return np.tile(np.asarray(DEFAULT_ALBEDO, np.float32), (nf, 1))


def _has_image(material: Any) -> bool:
    return material is not None and (getattr(material, "baseColorTexture", None) is not None
                                     or getattr(material, "image", None) is not None)


def _base_color(material: Any) -> tuple[float, float, float]:
    for attr in ("baseColorFactor", "main_color", "diffuse"):
        c = getattr(material, attr, None)
        if c is not None:
            c = np.asarray(c, np.float64)[:3]
            return tuple((c / 255.0 if c.max() > 1.0 else c).tolist())
    return DEFAULT_ALBEDO


def _pbr(mesh: trimesh.Trimesh) -> tuple[float, float]:
    material = getattr(mesh.visual, "material", None)
    metallic = getattr(material, "metallicFactor", None)
    rough = getattr(material, "roughnessFactor", None)
    return (float(metallic) if metallic is not None else 0.0, float(rough) if rough is not None else 0.8)


def load_meshes(path: Path) -> list[trimesh.Trimesh]:
    """Every geometry of a mesh file with its scene-graph transform applied."""
    try:
        loaded = trimesh.load(str(path), process=False)
    except Exception as exc:
        raise UserError(f"{path}: trimesh cannot read this mesh ({type(exc).__name__}: {exc})") from None
    if isinstance(loaded, trimesh.Scene):
        meshes = []
        for node in loaded.graph.nodes_geometry:
            transform, name = loaded.graph[node]
            geom = loaded.geometry[name]
            if isinstance(geom, trimesh.Trimesh) and len(geom.faces):
                g = geom.copy()
                g.apply_transform(transform)
                meshes.append(g)
        return meshes
    if isinstance(loaded, trimesh.Trimesh):
        return [loaded] if len(loaded.faces) else []
    raise UserError(f"{path}: holds no triangle mesh (got {type(loaded).__name__})")


def _aabb_box(instance: int, label: str, v: np.ndarray) -> ObjectBox:
    lo, hi = v.min(axis=0), v.max(axis=0)
    return ObjectBox(instance, label, (lo + hi) / 2, hi - lo, 0.0)


def _safe_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "scene"


# ---------------------------------------------------------------------------------------------- meshes folder
class MeshFolderImporter:
    """`root/*.{ply,obj,glb,…}`: one scene per file; `root/NAME/*.{…}`: one scene per folder, one instance per
    file. The class comes from the file name (`chair_02.obj` → chair); a name that names no class gives class
    "unknown" and instance 0 (no label), and a scene with no named file says its labels are absent."""

    def __init__(self, root: Path, up_axis: str = "z", scale: float = 1.0):
        self.root, self.up_axis, self.scale = Path(root), up_axis, scale

    def items(self) -> list[Path]:
        if not self.root.is_dir():
            raise UserError(f"{self.root}: not a directory of meshes")
        files = [p for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in MESH_EXTS]
        dirs = [p for p in self.root.iterdir() if p.is_dir() and any(
            q.suffix.lower() in MESH_EXTS for q in p.iterdir() if q.is_file())]
        found = sorted(files + dirs)
        if not found:
            raise UserError(f"{self.root}: no mesh files ({', '.join(MESH_EXTS)}) or folders of them")
        return found

    def load(self, item: Path) -> Scene:
        files = sorted(q for q in item.iterdir() if q.suffix.lower() in MESH_EXTS) if item.is_dir() else [item]
        sb = SceneBuilder(_safe_key(item.stem if item.is_file() else item.name))
        objects = []
        for f in files:
            label = map_label(f.stem.split("_")[0] if item.is_dir() else f.stem, default="unknown")
            inst = 0 if label == "unknown" else sb.new_instance()
            verts_all = []
            for mesh in load_meshes(f):
                v = np.asarray(mesh.vertices, np.float64) * self.scale
                if self.up_axis == "y":
                    v = y_up_to_z_up(v)
                metallic, rough = _pbr(mesh)
                mat = np.concatenate([_face_colors(mesh), np.tile([[metallic, rough]], (len(mesh.faces), 1))], axis=1)
                sb.add(v, np.asarray(mesh.faces), label, inst, mat)
                verts_all.append(v)
            if verts_all and label not in ("wall", "floor", "ceiling", "unknown"):
                objects.append(_aabb_box(inst, label, np.concatenate(verts_all)))
        return sb.build(objects=objects, meta={"source": "meshes", "file": item.name})


# ---------------------------------------------------------------------------------------------- ScanNet
class ScanNetImporter:
    """ScanNet layout: `SCENE/SCENE_vh_clean_2.ply`, `SCENE/SCENE.aggregation.json` (or `_vh_clean.aggregation.json`),
    `SCENE/SCENE_vh_clean_2.0.010000.segs.json`, optional `SCENE/SCENE.txt` (axisAlignment, image sizes),
    camera poses `SCENE/pose/*.txt` (4×4 camera-to-world) and intrinsics `SCENE/intrinsic/intrinsic_color.txt`."""

    def __init__(self, root: Path, views: int = 4, image_size: int = 64):
        self.root, self.views, self.image_size = Path(root), views, image_size

    def items(self) -> list[Path]:
        if not self.root.is_dir():
            raise UserError(f"{self.root}: not a directory of ScanNet scenes")
        found = sorted({p.parent for p in self.root.rglob("*_vh_clean_2.ply")})
        if not found:
            raise UserError(f"{self.root}: no ScanNet scenes (*_vh_clean_2.ply) found")
        return found

    def load(self, item: Path) -> Scene:
        name = item.name
        ply = next(iter(sorted(item.glob("*_vh_clean_2.ply"))))
        try:
            mesh = trimesh.load(str(ply), process=False)
        except Exception as exc:
            raise UserError(f"{ply}: cannot read ({type(exc).__name__}: {exc})") from None
        v = np.asarray(mesh.vertices, np.float64)
        faces = np.asarray(mesh.faces, np.int64)
        meta = _scannet_meta(item / f"{name}.txt")
        align = np.asarray(meta.get("axisAlignment", np.eye(4).ravel()), np.float64).reshape(4, 4)
        v = v @ align[:3, :3].T + align[:3, 3]
        colors = _face_colors(mesh)
        vert_obj, labels = _scannet_vertex_objects(item, name, len(v))
        # A face belongs to the object most of its vertices belong to (vertex 0's when all three differ).
        fo = vert_obj[faces]
        face_obj = np.where((fo[:, 1] == fo[:, 2]) & (fo[:, 0] != fo[:, 1]), fo[:, 1], fo[:, 0])
        sb = SceneBuilder(_safe_key(name))
        objects = []
        # One part per object (and one for unannotated faces) keeps faces grouped by instance. Instance ids are
        # ScanNet's objectId + 1 (its benchmark's convention); unannotated surfaces are "unknown", instance 0.
        for oid in [-1, *sorted(labels)]:
            sel = np.flatnonzero(face_obj == oid)
            if not len(sel):
                continue
            label = labels.get(oid, "unknown")
            inst = oid + 1
            mat = np.concatenate([colors[sel], np.tile([[0.0, 0.8]], (len(sel), 1))], axis=1)
            used, remap = np.unique(faces[sel], return_inverse=True)
            sb.add(v[used], remap.reshape(-1, 3), label, inst, mat)
            if inst and label not in ("wall", "floor", "ceiling", "other", "unknown"):
                objects.append(_aabb_box(inst, label, v[used]))
        scan_meta: dict[str, Any] = {"source": "scannet", "scan": name}
        if (item / "color").is_dir() and (item / "depth").is_dir():
            lo, hi = v.min(axis=0), v.max(axis=0)
            cameras, frames, ids = scannet_frames(item, meta, align, self.views, self.image_size, (lo, hi))
            scan_meta["frames"] = " ".join(ids)
            present = {"captured_frames": True, "materials": False, "layout": False}
            return sb.build(objects=objects, cameras=cameras or None, frames=frames or None, meta=scan_meta,
                            present=present)
        cameras = _scannet_cameras(item, meta, align, self.views, self.image_size)
        return sb.build(objects=objects, cameras=cameras or None, meta=scan_meta,
                        present={"captured_frames": False, "materials": False, "layout": False})


def _scannet_vertex_objects(item: Path, name: str, num_vertices: int) -> tuple[np.ndarray, dict[int, str]]:
    """Per vertex of `*_vh_clean_2.ply` its objectId (-1: unannotated) and per objectId its class.

    ScanNet's layout: `SCENE_vh_clean_2.0.010000.segs.json` holds `segIndices`, one over-segmentation segment id
    per vertex of the `_vh_clean_2` mesh; `SCENE.aggregation.json` holds `segGroups`, each an object
    (`objectId`, `label`: a raw category, `segments`: the segment ids it is made of) and names the segments file
    it was made on in `segmentsFile`. (`SCENE_vh_clean.aggregation.json` belongs to the full-resolution mesh's
    segments, not to `_vh_clean_2`, so it is used only when the segments file it names is this one.)"""
    vert_obj = np.full(num_vertices, -1, np.int64)
    seg_file = item / f"{name}_vh_clean_2.0.010000.segs.json"
    if not seg_file.is_file():
        seg_file = next(iter(sorted(item.glob("*_vh_clean_2*.segs.json"))), None)
    if seg_file is None:
        return vert_obj, {}
    agg_file = None
    for cand in [item / f"{name}.aggregation.json", *sorted(item.glob("*.aggregation.json"))]:
        if cand.is_file():
            named = str(_read_json(cand).get("segmentsFile", seg_file.name))
            if named.split("scannet.")[-1] == seg_file.name or named.endswith(seg_file.name):
                agg_file = cand
                break
    if agg_file is None:
        return vert_obj, {}
    segs = np.asarray(_read_json(seg_file)["segIndices"], np.int64)
    if len(segs) != num_vertices:
        raise UserError(f"{seg_file}: has {len(segs)} segment indices for {num_vertices} vertices")
    labels: dict[int, str] = {}
    seg_to_obj: dict[int, int] = {}
    for group in _read_json(agg_file).get("segGroups", []):
        oid = int(group.get("objectId", group.get("id", 0)))
        labels[oid] = map_label(str(group.get("label", "other")))
        for sid in group.get("segments", []):
            seg_to_obj[int(sid)] = oid
    if seg_to_obj:
        lut_keys = np.array(list(seg_to_obj), np.int64)
        lut_vals = np.array(list(seg_to_obj.values()), np.int64)
        order = np.argsort(lut_keys)
        lut_keys, lut_vals = lut_keys[order], lut_vals[order]
        pos = np.clip(np.searchsorted(lut_keys, segs), 0, len(lut_keys) - 1)
        hit = lut_keys[pos] == segs
        vert_obj[hit] = lut_vals[pos[hit]]
    return vert_obj, labels


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc})") from None


def _scannet_meta(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        try:
            nums = [float(x) for x in value.split()]
        except ValueError:
            continue
        out[key] = nums if len(nums) > 1 else nums[0]
    return out


def _scannet_cameras(item: Path, meta: dict[str, Any], align: np.ndarray, views: int, size: int) -> list[Camera]:
    poses = sorted((item / "pose").glob("*.txt"), key=lambda p: (len(p.stem), p.stem))
    if not poses or views == 0:
        return []
    intr_file = item / "intrinsic" / "intrinsic_color.txt"
    if intr_file.is_file():
        K = np.loadtxt(intr_file)[:3, :3]
        width, height = int(meta.get("colorWidth", 1296)), int(meta.get("colorHeight", 968))
    elif "fx_color" in meta:
        K = np.array([[meta["fx_color"], 0, meta["mx_color"]], [0, meta["fy_color"], meta["my_color"]], [0, 0, 1]])
        width, height = int(meta.get("colorWidth", 1296)), int(meta.get("colorHeight", 968))
    else:
        raise UserError(f"{item}: pose files but no intrinsic/intrinsic_color.txt or fx_color in {item.name}.txt")
    valid = []
    for p in poses:
        m = np.loadtxt(p).reshape(4, 4)
        if np.isfinite(m).all():
            valid.append(align @ m)
    if not valid:
        return []
    pick = np.unique(np.linspace(0, len(valid) - 1, min(views, len(valid))).round().astype(int))
    # Square renders: scale so the image height maps to `size`, then crop the width around the centre.
    s = size / height
    cams = []
    for i in pick:
        Ks = K.copy()
        Ks[:2] *= s
        Ks[0, 2] -= (width * s - size) / 2
        cams.append(Camera(Ks, valid[i], size, size))
    return cams


def _scannet_K(item: Path, meta: dict[str, Any], which: str) -> np.ndarray:
    f = item / "intrinsic" / f"intrinsic_{which}.txt"
    if f.is_file():
        return np.loadtxt(f).reshape(4, 4)[:3, :3].astype(np.float64)
    if f"fx_{which}" in meta:
        return np.array([[meta[f"fx_{which}"], 0, meta[f"mx_{which}"]], [0, meta[f"fy_{which}"], meta[f"my_{which}"]],
                         [0, 0, 1]], np.float64)
    raise UserError(f"{item}: frames but no intrinsic/intrinsic_{which}.txt or fx_{which} in {item.name}.txt")


def square_camera(K: np.ndarray, width: int, height: int, size: int) -> tuple[np.ndarray, int, int, int, int]:
    """The `size`² camera of an image resized to cover the square (aspect kept) and centre-cropped: its
    intrinsics, the resized (width, height) and the crop offsets (x, y) in resized pixels."""
    s = max(size / width, size / height)
    rw, rh = max(size, round(width * s)), max(size, round(height * s))
    ox, oy = (rw - size) // 2, (rh - size) // 2
    Kt = K.copy()
    Kt[0] *= rw / width
    Kt[1] *= rh / height
    Kt[0, 2] -= ox
    Kt[1, 2] -= oy
    return Kt, rw, rh, ox, oy


def resample_depth(depth: np.ndarray, K_depth: np.ndarray, K_target: np.ndarray, size: int) -> np.ndarray:
    """Depth (metres) of the depth camera seen through the target camera at the same pose: each target pixel
    centre's ray is projected into the depth image and takes its nearest pixel (no blending across edges).
    Same centre and axes, so z-depth along a ray is unchanged. 0 outside the depth image or where it is 0."""
    from interiorfusion_data.render import ray_directions

    d = ray_directions(K_target, size, size)
    p = d @ K_depth.T
    x = np.floor(p[:, 0] / p[:, 2]).astype(np.int64)
    y = np.floor(p[:, 1] / p[:, 2]).astype(np.int64)
    h, w = depth.shape
    ok = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    out = np.zeros(size * size, np.float32)
    out[ok] = depth[y[ok], x[ok]]
    return out.reshape(size, size)


def backproject(depth: np.ndarray, K: np.ndarray, pose: np.ndarray, stride: int = 1) -> np.ndarray:
    """World points (N, 3) of a z-depth map's valid pixels (pixel centres at u + 0.5), every `stride`-th pixel."""
    h, w = depth.shape
    vv, uu = np.mgrid[0:h:stride, 0:w:stride]
    z = depth[vv, uu].ravel().astype(np.float64)
    keep = z > 0
    u, v, z = uu.ravel()[keep] + 0.5, vv.ravel()[keep] + 0.5, z[keep]
    cam = np.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z], axis=1)
    return cam @ pose[:3, :3].T + pose[:3, 3]


def _frame_id_key(stem: str) -> tuple[int, str]:
    return (int(stem), stem) if stem.isdigit() else (1 << 62, stem)


MAX_CANDIDATE_FRAMES = 300  # a scan has thousands of frames (30 fps): coverage is scored on an even subset
COVERAGE_CELLS = 64  # coverage is counted in cells of the mesh's longest side / 64


def scannet_frames(item: Path, meta: dict[str, Any], align: np.ndarray, views: int, size: int,
                   bounds: tuple[np.ndarray, np.ndarray]) -> tuple[list[Camera], list, list[str]]:
    """The scan's captured frames chosen as its views: cameras, (rgb, depth) pairs and the frame ids.

    Frames are `color/ID.jpg`, `depth/ID.png` (uint16 mm), `pose/ID.txt` (4×4 camera-to-world; frames whose pose
    has a non-finite entry are skipped). Views are chosen greedily by coverage: each pick is the frame whose
    back-projected depth covers the most cells (of the mesh's bounding box) not covered by the frames picked so
    far; once nothing new is covered, the frames covering most cells fill the rest. Colour and depth are
    resampled into one camera, the colour camera resized to cover `size`² and centre-cropped (area filter);
    depth is looked up through the depth intrinsics at the same pose (ScanNet's depth-to-colour extrinsic is
    the identity). The axis alignment is applied to the poses as to the mesh."""
    from PIL import Image

    if views == 0:
        return [], [], []
    ids = sorted({p.stem for p in (item / "color").glob("*.jpg")} & {p.stem for p in (item / "depth").glob("*.png")}
                 & {p.stem for p in (item / "pose").glob("*.txt")}, key=_frame_id_key)
    poses: dict[str, np.ndarray] = {}
    for i in ids:
        try:
            m = np.loadtxt(item / "pose" / f"{i}.txt").reshape(4, 4)
        except ValueError:
            continue
        if np.isfinite(m).all():
            poses[i] = align @ m
    valid = list(poses)
    if not valid:
        return [], [], []
    if len(valid) > MAX_CANDIDATE_FRAMES:
        valid = [valid[int(j)] for j in np.linspace(0, len(valid) - 1, MAX_CANDIDATE_FRAMES).round()]
    K_color, K_depth = _scannet_K(item, meta, "color"), _scannet_K(item, meta, "depth")
    lo, hi = bounds
    cell = float((hi - lo).max()) / COVERAGE_CELLS or 1.0
    covers: dict[str, set[int]] = {}
    for i in valid:
        depth = np.asarray(Image.open(item / "depth" / f"{i}.png"), np.float32) / 1000.0
        stride = max(1, depth.shape[1] // 80)
        pts = backproject(depth, K_depth, poses[i], stride)
        pts = pts[((pts >= lo - cell) & (pts <= hi + cell)).all(axis=1)]
        c = np.floor((pts - lo) / cell).astype(np.int64) + 2
        covers[i] = set(((c[:, 0] * 4096 + c[:, 1]) * 4096 + c[:, 2]).tolist())
    chosen: list[str] = []
    seen: set[int] = set()
    while len(chosen) < min(views, len(valid)):
        rest = [i for i in valid if i not in chosen]
        gain = [len(covers[i] - seen) for i in rest]
        best = int(np.argmax(gain))
        if gain[best] == 0:
            best = int(np.argmax([len(covers[i]) for i in rest]))
        chosen.append(rest[best])
        seen |= covers[rest[best]]
    cams, frames = [], []
    for i in chosen:
        with Image.open(item / "color" / f"{i}.jpg") as img:
            rgb_img = img.convert("RGB")
        Kt, rw, rh, ox, oy = square_camera(K_color, rgb_img.width, rgb_img.height, size)
        rgb = np.asarray(rgb_img.resize((rw, rh), Image.Resampling.BOX))[oy:oy + size, ox:ox + size]
        depth = np.asarray(Image.open(item / "depth" / f"{i}.png"), np.float32) / 1000.0
        frames.append((np.ascontiguousarray(rgb, np.uint8), resample_depth(depth, K_depth, Kt, size)))
        cams.append(Camera(Kt, poses[i], size, size))
    return cams, frames, chosen


# ---------------------------------------------------------------------------------------------- HM3D
class HM3DImporter:
    """Habitat-Matterport 3D (habitat layout): `SCENE/HASH.basis.glb` (or `HASH.glb`) with, where annotated,
    `HASH.semantic.glb` and `HASH.semantic.txt`. The txt lists objects as `id,hexcolour,"name",region` (a first
    line that is not such a row is a header); the semantic mesh's colours encode each face's object by that hex
    colour (vertex colours: a face takes its first vertex's; textures are sampled at the vertices and the most
    frequent colour of the three wins). Names → classes by keyword (`map_label`), instance = object id. The
    semantic mesh gives the geometry and labels; albedo comes from the main mesh when it has the same faces
    (Basis-compressed textures cannot be decoded here: then the material's base colour). glTF is y-up; scenes
    are z-up. HM3D has no captured frames: views are rendered from cameras placed inside, on the outline of the
    floor-labelled faces; there is no wall layout and no PBR material."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @staticmethod
    def _main_mesh(folder: Path) -> Path | None:
        glbs = [p for p in sorted(folder.glob("*.glb")) if not p.name.endswith(".semantic.glb")]
        basis = [p for p in glbs if p.name.endswith(".basis.glb")]
        return (basis or glbs or [None])[0]

    def items(self) -> list[Path]:
        if not self.root.is_dir():
            raise UserError(f"{self.root}: not a directory of HM3D scenes")
        found = sorted({p.parent for p in self.root.rglob("*.glb") if self._main_mesh(p.parent) is not None})
        if not found:
            raise UserError(f"{self.root}: no HM3D scenes (*.basis.glb / *.glb) found")
        return found

    def load(self, item: Path) -> Scene:
        main = self._main_mesh(item)
        assert main is not None
        stem = main.name.removesuffix(".glb").removesuffix(".basis")
        sem_glb, sem_txt = item / f"{stem}.semantic.glb", item / f"{stem}.semantic.txt"
        objects_txt = _hm3d_objects(sem_txt) if sem_txt.is_file() and sem_glb.is_file() else {}
        main_meshes = load_meshes(main)
        geo = load_meshes(sem_glb) if objects_txt else main_meshes
        v = np.concatenate([np.asarray(m.vertices, np.float64) for m in geo])
        offs = np.cumsum([0] + [len(m.vertices) for m in geo])[:-1]
        faces = np.concatenate([np.asarray(m.faces, np.int64) + o for m, o in zip(geo, offs, strict=True)])
        v = y_up_to_z_up(v)
        colors = np.concatenate([_face_colors(m) for m in main_meshes])
        if len(colors) != len(faces):
            colors = np.tile(np.asarray(DEFAULT_ALBEDO, np.float32), (len(faces), 1))
        face_obj = np.zeros(len(faces), np.int64)
        if objects_txt:
            by_colour = {c: oid for oid, (c, _) in objects_txt.items()}
            codes = np.concatenate([_hm3d_face_codes(m) for m in geo])
            face_obj = np.array([by_colour.get(int(c), 0) for c in codes.tolist()], np.int64)
        sb = SceneBuilder(_safe_key(item.name))
        objects = []
        for oid in np.unique(face_obj).tolist():
            sel = np.flatnonzero(face_obj == oid)
            label = map_label(objects_txt[oid][1]) if oid in objects_txt else "unknown"
            inst = oid if oid in objects_txt else 0
            mat = np.concatenate([colors[sel], np.tile([[0.0, 0.8]], (len(sel), 1))], axis=1)
            used, remap = np.unique(faces[sel], return_inverse=True)
            sb.add(v[used], remap.reshape(-1, 3), label, inst, mat)
            if inst and label not in ("wall", "floor", "ceiling", "other", "unknown"):
                objects.append(_aabb_box(inst, label, v[used]))
        scene = sb.build(objects=objects, meta={"source": "hm3d", "scan": item.name},
                         present={"captured_frames": False, "materials": False, "layout": False})
        return with_floor_outline(scene)


def _hm3d_objects(path: Path) -> dict[int, tuple[int, str]]:
    """`HASH.semantic.txt` → {object id: (colour as int 0xRRGGBB, name)}."""
    out: dict[int, tuple[int, str]] = {}
    for line in path.read_text().splitlines():
        m = re.match(r'\s*(\d+)\s*,\s*([0-9A-Fa-f]{6})\s*,\s*"?([^",]*)"?\s*(?:,.*)?$', line)
        if m:
            out[int(m.group(1))] = (int(m.group(2), 16), m.group(3))
    if not out:
        raise UserError(f"{path}: no `id,hexcolour,\"name\",region` rows")
    return out


def _hm3d_face_codes(mesh: trimesh.Trimesh) -> np.ndarray:
    """Per face of a semantic mesh its colour as 0xRRGGBB."""
    visual = mesh.visual
    if visual.kind == "texture":
        visual = visual.to_color()
    if visual.kind == "face":
        fc = np.asarray(visual.face_colors, np.int64)[:, :3]
        return (fc[:, 0] << 16) | (fc[:, 1] << 8) | fc[:, 2]
    vc = np.asarray(visual.vertex_colors, np.int64)[:, :3]
    code = (vc[:, 0] << 16) | (vc[:, 1] << 8) | vc[:, 2]
    fcodes = code[mesh.faces]
    # The colour two vertices agree on, else the first vertex's.
    return np.where((fcodes[:, 1] == fcodes[:, 2]) & (fcodes[:, 0] != fcodes[:, 1]), fcodes[:, 1], fcodes[:, 0])


# ---------------------------------------------------------------------------------------------- 3D-FRONT
FRONT_TYPES = {"floor": "floor", "ceiling": "ceiling", "wallinner": "wall", "door": "door", "window": "window",
               "baseboard": "wall", "front": "wall", "back": "wall", "walltop": None, "wallouter": None,
               "wallbottom": None, "slabside": None, "slabtop": None, "slabbottom": None, "pocket": "wall",
               "customizedceiling": "ceiling", "customizedplatform": "floor"}


def _quat_matrix(q: list[float]) -> np.ndarray:
    x, y, z, w = (float(c) for c in q)
    n = math.sqrt(x * x + y * y + z * z + w * w) or 1.0
    x, y, z, w = x / n, y / n, z / n, w / n
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


class Front3DImporter:
    """3D-FRONT houses (`*.json`): layout meshes inline (`mesh[]` with `type`, `xyz`, `faces`), furniture by
    reference (`furniture[]` with `jid` → `{model_dir}/{jid}/raw_model.obj`), placed by `scene.room[].children[]`
    (`ref`, `pos`, `rot` quaternion xyzw, `scale`). One scene per room. The files are y-up; scenes are z-up.
    A furniture's class comes from its `category` in the house JSON, else from 3D-FUTURE's
    `{model_dir}/model_info.json` (`model_id` → `category`), else from its `title`."""

    def __init__(self, root: Path, model_dir: Path | None = None):
        self.root = Path(root)
        self.model_dir = Path(model_dir) if model_dir else self.root / "3D-FUTURE-model"
        self._model_info: dict[str, str] | None = None

    def model_category(self, jid: str) -> str | None:
        if self._model_info is None:
            info = self.model_dir / "model_info.json"
            rows = _read_json(info) if info.is_file() else []
            self._model_info = {str(r.get("model_id")): str(r["category"]) for r in rows
                                if isinstance(r, dict) and r.get("category")}
        return self._model_info.get(jid)

    def items(self) -> list[tuple[Path, int]]:
        if not self.root.is_dir():
            raise UserError(f"{self.root}: not a directory of 3D-FRONT JSON files")
        out = []
        for f in sorted(self.root.glob("*.json")):
            house = _read_json(f)
            rooms = house.get("scene", {}).get("room", [])
            out += [(f, i) for i, r in enumerate(rooms) if r.get("children")]
        if not out:
            raise UserError(f"{self.root}: no 3D-FRONT house JSON with rooms found")
        return out

    def load(self, item: tuple[Path, int]) -> Scene:
        path, room_index = item
        house = _read_json(path)
        room = house["scene"]["room"][room_index]
        meshes = {m["uid"]: m for m in house.get("mesh", [])}
        furniture = {f["uid"]: f for f in house.get("furniture", [])}
        colors = {m.get("uid"): m.get("color") for m in house.get("material", [])}
        sb = SceneBuilder(_safe_key(f"{path.stem}-{room.get('instanceid', room_index)}"))
        objects, wall_meshes, openings = [], [], []
        model_cache: dict[str, list[trimesh.Trimesh]] = {}
        for child in room.get("children", []):
            ref = child.get("ref")
            pos = np.asarray(child.get("pos", [0, 0, 0]), np.float64)
            rot = _quat_matrix(child.get("rot", [0, 0, 0, 1]))
            scale = np.asarray(child.get("scale", [1, 1, 1]), np.float64)
            if ref in meshes:
                m = meshes[ref]
                label = FRONT_TYPES.get(str(m.get("type", "")).lower().replace(" ", ""), "wall")
                if label is None:
                    continue
                v = np.asarray(m["xyz"], np.float64).reshape(-1, 3)
                f = np.asarray(m["faces"], np.int64).reshape(-1, 3)
                v = y_up_to_z_up((v * scale) @ rot.T + pos)
                inst = sb.new_instance()
                rgb = _front_color(colors.get(m.get("material")))
                sb.add(v, f, label, inst, np.tile([*rgb, 0.0, 0.85], (len(f), 1)))
                if label == "wall":
                    wall_meshes.append((v, inst))
                elif label in ("door", "window"):
                    openings.append((label, v, inst))
            elif ref in furniture:
                fur = furniture[ref]
                jid = str(fur.get("jid", ""))
                label = map_label(str(fur.get("category") or self.model_category(jid) or fur.get("title") or "other"))
                model = self.model_dir / jid / "raw_model.obj"
                if jid not in model_cache:
                    if not model.is_file():
                        raise UserError(f"{path}: furniture '{jid}' has no model file {model}")
                    model_cache[jid] = load_meshes(model)
                inst = sb.new_instance()
                local_all = []
                for mesh in model_cache[jid]:
                    lv = np.asarray(mesh.vertices, np.float64) * scale
                    v = y_up_to_z_up(lv @ rot.T + pos)
                    metallic, rough = _pbr(mesh)
                    mat = np.concatenate([_face_colors(mesh), np.tile([[metallic, rough]], (len(mesh.faces), 1))], 1)
                    sb.add(v, np.asarray(mesh.faces), label, inst, mat)
                    local_all.append(lv)
                if local_all:
                    objects.append(_front_box(inst, label, np.concatenate(local_all), rot, pos))
        walls = [_wall_from_mesh(v, inst) for v, inst in wall_meshes]
        doors, windows = [], []
        for label, v, inst in openings:
            op = _opening(label, v, inst, walls)
            if op is not None:
                (doors if label == "door" else windows).append(op)
        scene = sb.build(objects=objects, walls=walls, doors=doors, windows=windows,
                         meta={"source": "front3d", "house": path.stem, "room": str(room.get("type", ""))})
        return with_floor_outline(scene)


def _front_color(color: Any) -> tuple[float, float, float]:
    if not color:
        return DEFAULT_ALBEDO
    c = np.asarray(color, np.float64)[:3]
    return tuple((c / 255.0 if c.max() > 1.0 else c).tolist())


def _front_box(inst: int, label: str, local: np.ndarray, rot: np.ndarray, pos: np.ndarray) -> ObjectBox:
    """The model's local bounding box, placed: 3D-FRONT rotates furniture about the up axis only."""
    lo, hi = local.min(axis=0), local.max(axis=0)
    centre = y_up_to_z_up(((lo + hi) / 2 @ rot.T + pos)[None])[0]
    size_yup = hi - lo
    # Local x in the world (z-up): its heading is the yaw.
    x_world = y_up_to_z_up((rot @ np.array([1.0, 0.0, 0.0]))[None])[0]
    yaw = math.atan2(x_world[1], x_world[0])
    return ObjectBox(inst, label, centre, np.array([size_yup[0], size_yup[2], size_yup[1]]), yaw)


def _wall_from_mesh(v: np.ndarray, inst: int) -> Wall:
    xy = v[:, :2]
    centre = xy.mean(axis=0)
    # Principal direction of the wall's footprint.
    cov = np.cov((xy - centre).T) if len(xy) > 1 else np.eye(2)
    _, vecs = np.linalg.eigh(cov)
    d = vecs[:, -1]
    t = (xy - centre) @ d
    a, b = centre + d * t.min(), centre + d * t.max()
    z0, z1 = float(v[:, 2].min()), float(v[:, 2].max())
    return Wall(np.array([a[0], a[1], z0]), np.array([b[0], b[1], z0]), z1 - z0, 0.1, inst)


def _opening(label: str, v: np.ndarray, inst: int, walls: list[Wall]) -> Opening | None:
    if not walls:
        return None
    centre = (v.min(axis=0) + v.max(axis=0)) / 2
    best, best_d, best_w = None, float("inf"), 0.0
    for i, w in enumerate(walls):
        a, b = w.a[:2], w.b[:2]
        ab = b - a
        s = float(np.clip(np.dot(centre[:2] - a, ab) / max(np.dot(ab, ab), 1e-12), 0, 1))
        dist = float(np.linalg.norm(a + ab * s - centre[:2]))
        if dist < best_d:
            d = ab / max(np.linalg.norm(ab), 1e-12)
            proj = (v[:, :2] - a) @ d
            best, best_d, best_w = i, dist, float(proj.max() - proj.min())
    assert best is not None
    return Opening(label, best, centre, best_w, float(v[:, 2].max() - v[:, 2].min()), inst)


def with_floor_outline(scene: Scene) -> Scene:
    """The scene with its floor polygon (the outline of its floor-class faces) and room height, when it has a floor."""
    floor = scene.faces[scene.face_class == CLASS_ID["floor"]]
    if len(floor):
        poly = floor_outline(scene.vertices[:, :2], floor)
        if poly is not None:
            scene.floor_polygon = poly
            scene.meta["room_height"] = float(scene.vertices[:, 2].max() - scene.vertices[:, 2].min())
    return scene


def floor_outline(xy: np.ndarray, faces: np.ndarray) -> np.ndarray | None:
    """The longest boundary loop of a 2D triangle set, counter-clockwise."""
    # Weld vertices by position so separate meshes of one floor share edges.
    keys = np.round(xy[faces.ravel()], 4)
    uniq, inv = np.unique(keys, axis=0, return_inverse=True)
    f = inv.reshape(-1, 3)
    edges = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    und = np.sort(edges, axis=1)
    _, idx, counts = np.unique(und, axis=0, return_index=True, return_counts=True)
    boundary = edges[idx[counts == 1]]
    if not len(boundary):
        return None
    nxt: dict[int, int] = {}
    for a, b in boundary.tolist():
        nxt.setdefault(a, b)
    best: list[int] = []
    seen: set[int] = set()
    for start in nxt:
        if start in seen:
            continue
        loop, cur = [], start
        while cur not in seen and cur in nxt:
            seen.add(cur)
            loop.append(cur)
            cur = nxt[cur]
        if len(loop) > len(best):
            best = loop
    if len(best) < 3:
        return None
    poly = uniq[best]
    area = 0.5 * (np.dot(poly[:, 0], np.roll(poly[:, 1], -1)) - np.dot(poly[:, 1], np.roll(poly[:, 0], -1)))
    return poly if area > 0 else poly[::-1]


def make_importer(source: str, root: Path, cfg: Any
                  ) -> MeshFolderImporter | ScanNetImporter | HM3DImporter | Front3DImporter:
    if source == "meshes":
        return MeshFolderImporter(root, cfg.importer.up_axis, cfg.importer.scale)
    if source == "scannet":
        return ScanNetImporter(root, cfg.render.views, cfg.render.image_size)
    if source == "hm3d":
        return HM3DImporter(root)
    if source == "front3d":
        model_dir = Path(cfg.importer.model_dir) if cfg.importer.model_dir else None
        return Front3DImporter(root, model_dir)
    raise UserError(f"unknown source '{source}'")


__all__ = ["CLASSES", "Front3DImporter", "HM3DImporter", "MeshFolderImporter", "ScanNetImporter", "make_importer",
           "map_label"]
