"""Per-voxel PBR materials out of the model: a textured .glb, its check by Khronos' glTF-Validator, previews.

    data = textured_glb(voxels, materials, origin, voxel_size, classes=classes)   # bytes of a .glb
    validate_glb(data)["issues"]["numErrors"]                                      # 0 (needs Node.js)
    png = material_previews(voxels, materials, origin, voxel_size, K, pose, H, W, lights, truth=(tv, tm))

Materials are [V, 8] per voxel: albedo RGB, metallic, roughness (all in [0, 1]; albedo as stored, i.e. sRGB
display values), normal XYZ (world frame, z up, roughly unit). Frame: the structure stage's voxel frame (z up,
metres = origin + voxel index · voxel_size); the .glb is converted to glTF's y-up convention like
`interiorfusion_structure.generate.scene_glb`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from interiorfusion_core.errors import UserError

ALBEDO, METALLIC, ROUGHNESS, NORMAL = slice(0, 3), 3, 4, slice(5, 8)
CHANNELS = 8

# z-up voxel frame → glTF y-up: (x, y, z) ↦ (x, z, −y) (as scene_glb).
TO_Y_UP = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]], np.float64)

# glTF sampler and buffer-view target constants (WebGL enums).
_NEAREST, _CLAMP_TO_EDGE = 9728, 33071
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963


def _inputs(voxels: np.ndarray, materials: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vox = np.asarray(voxels)
    mat = np.asarray(materials, np.float64)
    if vox.ndim != 2 or vox.shape[1] != 3:
        raise UserError(f"voxels must be [V, 3] integer coordinates, got shape {list(vox.shape)}")
    if mat.ndim != 2 or mat.shape != (len(vox), CHANNELS):
        raise UserError(f"materials must be [V, {CHANNELS}] (albedo RGB, metallic, roughness, normal XYZ) for "
                        f"{len(vox)} voxels, got shape {list(mat.shape)}")
    return vox.astype(np.int64), np.nan_to_num(mat)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ .glb
def atlas_shape(count: int) -> tuple[int, int]:
    """(width, height) of the texture atlas for `count` texels, one per voxel: powers of two, width the smallest
    square side that holds them all, height the smallest power of two that then suffices (so H ≤ W)."""
    width = 1 << max(0, int(np.ceil(np.log2(max(1.0, np.ceil(np.sqrt(count)))))))
    height = 1 << max(0, int(np.ceil(np.log2(max(1, -(-count // width))))))
    return width, height


def textured_glb(voxels: np.ndarray, materials: np.ndarray, origin: np.ndarray, voxel_size: float, *,
                 classes: np.ndarray | None = None, class_names: Sequence[str] | None = None) -> bytes:
    """The voxels with their materials as a binary glTF (bytes of a .glb), in metres, y up.

    Geometry: the exposed voxel faces (those whose neighbour is empty), two triangles per face, with the faces'
    own (geometric, outward) normals as the NORMAL attribute. Without `classes`, one mesh (node "voxels"); with
    `classes` ([V] ids), one mesh per class, named `class_names[id]` (default: the data stage's class names,
    `class_<id>` past their end) — all sharing one material and one atlas.

    Materials: one metallic-roughness PBR material whose textures carry the values, one texel per voxel (voxel i
    at column i mod W, row i div W of a W×H atlas, see atlas_shape): `baseColorTexture` holds the albedo (RGB,
    sRGB as stored), `metallicRoughnessTexture` the glTF packing G = roughness, B = metallic (R unused, 0). Every
    face's 4 vertices have the UV of its voxel's texel centre, and the sampler filters NEAREST and clamps, so
    faces never bleed into their neighbours' texels. Factors are 1 (baseColorFactor, metallicFactor,
    roughnessFactor). Values are clipped to [0, 1] and rounded to uint8.

    Normals: glTF's normal maps are tangent-space perturbations of the geometry's normal; the predicted normals
    are world-space directions of a voxel's surface, so they are not written as a normal map (a viewer would
    reinterpret them in each face's tangent frame). The .glb carries the face normals; the predicted normal
    appears in `material_previews` only.
    """
    import trimesh
    from PIL import Image

    from interiorfusion_structure.generate import exposed_faces

    vox, mat = _inputs(voxels, materials)
    if not len(vox):
        raise UserError("the scene has no voxels to write")
    keys = _keys(vox)
    order = np.argsort(keys, kind="stable")
    if len(keys) > 1 and bool((np.diff(keys[order]) == 0).any()):
        raise UserError("voxels must be unique: some coordinates appear more than once")
    if classes is not None:
        classes = np.asarray(classes).astype(np.int64).reshape(-1)
        if len(classes) != len(vox):
            raise UserError(f"classes must have one id per voxel ({len(vox)}), got {len(classes)}")
    if class_names is None and classes is not None:
        from interiorfusion_data.scene import CLASSES

        class_names = CLASSES

    width, height = atlas_shape(len(vox))
    texels = np.zeros((width * height, 3), np.uint8)
    texels[: len(vox)] = _to_uint8(mat[:, ALBEDO])
    base_color = Image.fromarray(texels.reshape(height, width, 3), "RGB")
    texels = np.zeros((width * height, 3), np.uint8)
    texels[: len(vox), 1] = _to_uint8(mat[:, ROUGHNESS])
    texels[: len(vox), 2] = _to_uint8(mat[:, METALLIC])
    metallic_roughness = Image.fromarray(texels.reshape(height, width, 3), "RGB")
    material = trimesh.visual.material.PBRMaterial(
        name="voxel_materials", baseColorTexture=base_color, metallicRoughnessTexture=metallic_roughness,
        baseColorFactor=[255, 255, 255, 255], metallicFactor=1.0, roughnessFactor=1.0)

    occupied = {tuple(v) for v in vox.tolist()}
    origin = np.asarray(origin, np.float64).reshape(3)
    groups = [("voxels", np.arange(len(vox)))] if classes is None else [
        (_class_name(int(c), class_names), np.flatnonzero(classes == c)) for c in np.unique(classes)]
    glb = trimesh.Scene()
    for name, rows in groups:
        verts, faces = exposed_faces(vox[rows], occupied)
        if not len(faces):
            continue
        corners = verts.reshape(-1, 4, 3)
        normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 3] - corners[:, 0])  # outward, unit
        owner = np.rint(corners.mean(1) - 0.5 - 0.5 * normal).astype(np.int64)  # the voxel behind each quad
        index = order[np.searchsorted(keys[order], _keys(owner, like=vox))]
        uv = np.stack([(index % width + 0.5) / width, (index // width + 0.5) / height], 1)
        uv[:, 1] = 1.0 - uv[:, 1]  # trimesh's UVs are bottom-up; it flips them back to glTF's top-down
        mesh = trimesh.Trimesh(origin + verts * voxel_size, faces, process=False,
                               vertex_normals=np.repeat(normal, 4, axis=0))
        mesh.visual = trimesh.visual.TextureVisuals(uv=np.repeat(uv, 4, axis=0), material=material)
        glb.add_geometry(mesh, node_name=name, geom_name=name, transform=TO_Y_UP)
    return _nearest_samplers(glb.export(file_type="glb", include_normals=True))


def _class_name(cls: int, names: Sequence[str]) -> str:
    return str(names[cls]) if 0 <= cls < len(names) else f"class_{cls}"


def _keys(coords: np.ndarray, like: np.ndarray | None = None) -> np.ndarray:
    """One int64 per voxel coordinate (within the bounds of `like`, default `coords` itself)."""
    ref = coords if like is None else like
    lo, hi = ref.min(0), ref.max(0)
    dims = hi - lo + 1
    c = coords - lo
    return (c[:, 0] * dims[1] + c[:, 1]) * dims[2] + c[:, 2]


def _nearest_samplers(glb: bytes) -> bytes:
    """The .glb with one NEAREST / CLAMP_TO_EDGE sampler used by every texture, and the vertex and index buffer
    views' targets set (trimesh writes neither; the validator hints at the missing targets)."""
    magic, version, _ = struct.unpack_from("<4sII", glb, 0)
    length, kind = struct.unpack_from("<I4s", glb, 12)
    if magic != b"glTF" or version != 2 or kind != b"JSON":
        raise ValueError("not a glTF 2.0 binary with a leading JSON chunk")
    tree = json.loads(glb[20:20 + length])
    rest = glb[20 + length:]
    if tree.get("textures"):
        tree["samplers"] = [{"magFilter": _NEAREST, "minFilter": _NEAREST, "wrapS": _CLAMP_TO_EDGE,
                             "wrapT": _CLAMP_TO_EDGE}]
        for texture in tree["textures"]:
            texture["sampler"] = 0
    accessors, views = tree.get("accessors", []), tree.get("bufferViews", [])
    for mesh in tree.get("meshes", []):
        for primitive in mesh["primitives"]:
            for acc in primitive["attributes"].values():
                views[accessors[acc]["bufferView"]]["target"] = _ARRAY_BUFFER
            if "indices" in primitive:
                views[accessors[primitive["indices"]]["bufferView"]]["target"] = _ELEMENT_ARRAY_BUFFER
    chunk = json.dumps(tree, separators=(",", ":")).encode()
    chunk += b" " * (-len(chunk) % 4)  # chunks are 4-byte aligned; JSON pads with spaces
    head = struct.pack("<4sII", b"glTF", 2, 12 + 8 + len(chunk) + len(rest)) + struct.pack("<I4s", len(chunk),
                                                                                           b"JSON")
    return head + chunk + rest


# ------------------------------------------------------------------------------------------------ validation
VALIDATOR_DIR = Path(__file__).resolve().parents[4] / "tools" / "gltf-validator"
INSTALL = "npm ci --prefix tools/gltf-validator"


def validator_dir() -> Path:
    """tools/gltf-validator of the repository, or $INTERIORFUSION_GLTF_VALIDATOR (a copy elsewhere)."""
    return Path(os.environ.get("INTERIORFUSION_GLTF_VALIDATOR") or VALIDATOR_DIR)


def validate_glb(data: bytes, timeout: float = 300.0) -> dict[str, Any]:
    """Khronos glTF-Validator's report on a .glb (`report["issues"]["numErrors"]`, `["messages"]`, `["info"]`),
    run by Node.js on tools/gltf-validator/validate.mjs. Raises UserError naming what is missing (node, or the
    npm package: `npm ci --prefix tools/gltf-validator`) and when the validator cannot read the bytes at all."""
    node = shutil.which("node")
    if node is None:
        raise UserError("validate_glb needs Node.js: `node` is not on PATH (Debian: apt-get install nodejs npm; "
                        f"then {INSTALL})")
    root = validator_dir()
    script = root / "validate.mjs"
    if not script.is_file():
        raise UserError(f"{script}: the glTF-Validator wrapper is missing (set INTERIORFUSION_GLTF_VALIDATOR to a "
                        "copy of the repository's tools/gltf-validator)")
    if not (root / "node_modules" / "gltf-validator" / "package.json").is_file():
        raise UserError(f"the npm package gltf-validator is not installed in {root}: run `{INSTALL}` "
                        "(`make setup` does where npm is on PATH)")
    with tempfile.TemporaryDirectory(prefix="interiorfusion-gltf-") as tmp:
        path = Path(tmp) / "scene.glb"
        path.write_bytes(data)
        proc = subprocess.run([node, str(script), str(path)], capture_output=True, text=True, timeout=timeout,
                              check=False)
    if proc.returncode not in (0, 1):  # 1: a report with errors; anything else: no report
        raise UserError(f"glTF-Validator could not validate the file: {proc.stderr.strip() or proc.returncode}")
    return json.loads(proc.stdout)


# ------------------------------------------------------------------------------------------------ previews
def voxel_centres(voxels: np.ndarray, origin: np.ndarray, voxel_size: float) -> np.ndarray:
    """[V, 3] voxel centres in metres."""
    return np.asarray(origin, np.float64).reshape(3) + (np.asarray(voxels, np.float64) + 0.5) * voxel_size


def _camera(K: Any, cam_to_world: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.as_tensor(np.asarray(K, np.float64)).reshape(3, 3),
            torch.as_tensor(np.asarray(cam_to_world, np.float64)).reshape(4, 4))


def shade_voxels(voxels: np.ndarray, materials: np.ndarray, origin: np.ndarray, voxel_size: float,
                 eye: np.ndarray, lights: np.ndarray) -> np.ndarray:
    """[V, 3] display RGB of each voxel by the project's shading model (`shade_torch`, normals normalised) seen
    from `eye` under `lights` (L, 4) [x, y, z, intensity], world frame."""
    from interiorfusion_data.shading_torch import shade_torch

    vox, mat = _inputs(voxels, materials)
    m = torch.from_numpy(mat)
    rgb = shade_torch(torch.from_numpy(voxel_centres(vox, origin, voxel_size)), m[:, NORMAL],
                      m[:, ALBEDO].clamp(0, 1), m[:, METALLIC].clamp(0, 1), m[:, ROUGHNESS].clamp(0, 1),
                      torch.as_tensor(np.asarray(eye, np.float64)).reshape(3),
                      torch.as_tensor(np.asarray(lights, np.float64)).reshape(-1, 4), normalize=True)
    return rgb.numpy()


def _channels(voxels: np.ndarray, materials: np.ndarray, origin: np.ndarray, voxel_size: float, eye: np.ndarray,
              lights: np.ndarray) -> np.ndarray:
    """[V, 15]: the five preview tiles' RGB per voxel (albedo, roughness, metallic, normal, shaded)."""
    vox, mat = _inputs(voxels, materials)
    m = np.clip(mat, 0.0, 1.0)
    n = mat[:, NORMAL] / np.maximum(np.linalg.norm(mat[:, NORMAL], axis=1, keepdims=True), 1e-12)
    grey = np.ones((1, 3))
    return np.concatenate([m[:, ALBEDO], m[:, ROUGHNESS, None] * grey, m[:, METALLIC, None] * grey,
                           np.clip(n * 0.5 + 0.5, 0.0, 1.0), shade_voxels(vox, mat, origin, voxel_size, eye, lights)],
                          1)


def _splat(voxels: np.ndarray, features: np.ndarray, origin: np.ndarray, voxel_size: float, K: torch.Tensor,
           pose: torch.Tensor, height: int, width: int) -> np.ndarray:
    """[H, W, C] of per-voxel features splatted from the camera (soft_render), over white."""
    from interiorfusion_vae.render import soft_render

    if not len(voxels):
        return np.ones((height, width, features.shape[1]))
    points = torch.from_numpy(voxel_centres(voxels, origin, voxel_size))
    r = soft_render(points, torch.ones(len(points), dtype=torch.float64), K, pose, height, width, voxel_size,
                    features=torch.from_numpy(np.asarray(features, np.float64)))
    alpha = r.alpha.numpy()[..., None]
    return np.clip(r.features.numpy() * alpha + (1 - alpha), 0.0, 1.0)


def shaded_image(voxels: np.ndarray, materials: np.ndarray, origin: np.ndarray, voxel_size: float, K: Any,
                 cam_to_world: Any, height: int, width: int, lights: np.ndarray) -> np.ndarray:
    """float [H, W, 3] in [0, 1]: the voxels shaded (shade_voxels) and splatted from the camera, on white. K 3×3
    in pixels, cam_to_world 4×4 (OpenCV axes)."""
    Kt, pose = _camera(K, cam_to_world)
    vox, _ = _inputs(voxels, materials)
    rgb = shade_voxels(vox, materials, origin, voxel_size, pose[:3, 3].numpy(), lights)
    return _splat(vox, rgb, origin, voxel_size, Kt, pose, height, width)


def material_previews(voxels: np.ndarray, materials: np.ndarray, origin: np.ndarray, voxel_size: float, K: Any,
                      cam_to_world: Any, height: int, width: int, lights: np.ndarray, *,
                      truth: tuple[np.ndarray, np.ndarray] | None = None, tile: int = 160) -> bytes:
    """PNG sheet from one camera: albedo | roughness (grey) | metallic (grey) | normal (unit n · 0.5 + 0.5 as
    RGB) | shaded (shade_voxels under `lights`, eye = the camera centre), each tile `tile` pixels wide, on white;
    with `truth` = (voxels, materials), a second row of the same five tiles for it (same frame, origin and voxel
    size). K 3×3 in pixels, cam_to_world 4×4 (OpenCV axes), lights (L, 4) [x, y, z, intensity] world frame.
    soft_render splats into a 5×5 pixel window: voxels wider than about 5 pixels on screen leave gaps."""
    from PIL import Image

    Kt, pose = _camera(K, cam_to_world)
    eye = pose[:3, 3].numpy()
    rows = [(voxels, materials)] + ([truth] if truth is not None else [])
    tile_h = max(1, round(tile * height / width))
    sheet = Image.new("RGB", (5 * tile, tile_h * len(rows)), "white")
    for r, (vox, mat) in enumerate(rows):
        vox, mat = _inputs(vox, mat)
        image = _splat(vox, _channels(vox, mat, origin, voxel_size, eye, lights), origin, voxel_size, Kt, pose,
                       height, width)
        for i in range(5):
            arr = _to_uint8(image[..., 3 * i:3 * i + 3])
            sheet.paste(Image.fromarray(arr).resize((tile, tile_h), Image.NEAREST), (i * tile, r * tile_h))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()
