"""A compact binary glTF of a voxel scene for the viewer: the surface voxels as GPU instances of one cube.

    data = voxel_glb(voxels, origin, voxel_size, classes, palette, class_names, materials=materials)

The stages' own .glb exports (exposed faces, texture atlases) are the files to take elsewhere; a viewer page
inlines its scenes, and instancing is about ten times smaller: a surface voxel costs 12 bytes of translation and
4 of colour, where the exposed-face mesh costs about 150 bytes per face. The scene has two top-level nodes the
viewer switches between (tools/viewer/src/viewer.js):

- `semantic`: one child per (class, material bin), the class's palette colour;
- `pbr`: the same children with a metallic-roughness material per bin (metallic split at 0.5, roughness in
  quarters, each bin's mean value) and the voxel's albedo as the instance colour (EXT_mesh_gpu_instancing's
  `_COLOR_0`, linear, as three.js multiplies it). Without materials the `pbr` children use the class colours.

Frame: the stages' z-up voxel frame (metres = origin + index · voxel_size) converted to glTF's y-up,
(x, y, z) ↦ (x, z, −y), as the stages' .glb exports. Only voxels with an empty 6-neighbour are kept (the
others cannot be seen), and scenes with more than `max_instances` of them are coarsened by 2 until they fit.
"""

from __future__ import annotations

import itertools
import json
import struct
from collections.abc import Sequence

import numpy as np

from interiorfusion_core.errors import UserError

TO_Y_UP = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], np.float64)
_FLOAT, _UBYTE, _USHORT = 5126, 5121, 5123
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_NEIGHBOURS = np.array([(-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)], np.int64)
ROUGHNESS_BINS = 4
DEFAULT_MAX_INSTANCES = 150_000


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    c = np.clip(np.asarray(c, np.float64), 0.0, 1.0)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _keys(coords: np.ndarray, lo: np.ndarray, dims: np.ndarray) -> np.ndarray:
    c = coords - lo
    return (c[:, 0] * dims[1] + c[:, 1]) * dims[2] + c[:, 2]


def surface_mask(voxels: np.ndarray) -> np.ndarray:
    """[V] bool: the voxels with at least one empty face neighbour."""
    vox = np.asarray(voxels, np.int64)
    if not len(vox):
        return np.zeros(0, bool)
    lo, dims = vox.min(0) - 1, vox.max(0) - vox.min(0) + 3
    occupied = np.sort(_keys(vox, lo, dims))
    exposed = np.zeros(len(vox), bool)
    for d in _NEIGHBOURS:
        keys = _keys(vox + d, lo, dims)
        at = np.clip(np.searchsorted(occupied, keys), 0, len(occupied) - 1)
        exposed |= occupied[at] != keys
    return exposed


def coarsen(voxels: np.ndarray, classes: np.ndarray, materials: np.ndarray | None, factor: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Voxels merged `factor`³ → 1: occupied if any child is, the majority class, the mean material."""
    parent = np.asarray(voxels, np.int64) // factor
    lo = parent.min(0)
    dims = parent.max(0) - lo + 1
    uniq, inverse = np.unique(_keys(parent, lo, dims), return_inverse=True)
    n = len(uniq)
    coords = np.zeros((n, 3), np.int64)
    coords[inverse] = parent
    num_classes = int(classes.max()) + 1 if len(classes) else 1
    votes = np.zeros((n, num_classes), np.int64)
    np.add.at(votes, (inverse, classes), 1)
    merged = None
    if materials is not None:
        merged = np.zeros((n, materials.shape[1]), np.float64)
        np.add.at(merged, inverse, materials)
        merged /= np.bincount(inverse, minlength=n)[:, None]
    return coords, votes.argmax(1), merged


def voxel_glb(voxels: np.ndarray, origin: Sequence[float], voxel_size: float, classes: np.ndarray,
              palette: np.ndarray, class_names: Sequence[str], *, materials: np.ndarray | None = None,
              max_instances: int = DEFAULT_MAX_INSTANCES) -> bytes:
    """The scene as .glb bytes (module docstring). `voxels` [V, 3] integer coordinates, `classes` [V] ids into
    `palette` ([C, 3] uint8 sRGB) and `class_names`; `materials` [V, ≥5]: albedo RGB (sRGB), metallic, roughness
    in [0, 1] (the data and material stages' channel order)."""
    vox = np.asarray(voxels)
    if vox.ndim != 2 or vox.shape[1] != 3 or not len(vox):
        raise UserError(f"a viewer scene needs voxels [V, 3] with V ≥ 1, got shape {list(vox.shape)}")
    vox = vox.astype(np.int64)
    cls = np.asarray(classes).astype(np.int64).reshape(-1)
    if len(cls) != len(vox):
        raise UserError(f"a viewer scene needs one class per voxel ({len(vox)}), got {len(cls)}")
    mat = None
    if materials is not None:
        mat = np.nan_to_num(np.asarray(materials, np.float64))
        if mat.shape[0] != len(vox) or mat.ndim != 2 or mat.shape[1] < 5:
            raise UserError(f"viewer materials must be [V, ≥5] (albedo RGB, metallic, roughness) for {len(vox)} "
                            f"voxels, got shape {list(mat.shape)}")
        mat = mat[:, :5]
    size = float(voxel_size)
    keep = surface_mask(vox)
    vox, cls, mat = vox[keep], cls[keep], (mat[keep] if mat is not None else None)
    while len(vox) > max_instances:
        vox, cls, mat = coarsen(vox, cls, mat, 2)
        size *= 2
        keep = surface_mask(vox)
        vox, cls, mat = vox[keep], cls[keep], (mat[keep] if mat is not None else None)
    # The coarsened voxel's origin stays at its first child's corner: index · size is the same point.
    palette = np.asarray(palette, np.uint8).reshape(-1, 3)
    cls = np.clip(cls, 0, None)

    if mat is not None:
        metal_bin = (mat[:, 3] >= 0.5).astype(np.int64)
        rough_bin = np.clip((mat[:, 4] * ROUGHNESS_BINS).astype(np.int64), 0, ROUGHNESS_BINS - 1)
        material_bin = metal_bin * ROUGHNESS_BINS + rough_bin
    else:
        material_bin = np.zeros(len(vox), np.int64)
    order = np.lexsort((material_bin, cls))
    vox, cls, material_bin = vox[order], cls[order], material_bin[order]
    mat = mat[order] if mat is not None else None

    corner = np.asarray(origin, np.float64).reshape(3) + vox * size
    translations = (corner @ TO_Y_UP.T).astype(np.float32)
    if mat is not None:
        albedo = srgb_to_linear(mat[:, :3])
    else:
        albedo = srgb_to_linear(palette[cls % len(palette)] / 255.0)
    colors = np.concatenate([np.round(albedo * 255), np.full((len(vox), 1), 255)], 1).astype(np.uint8)
    return _write(translations, colors, cls, material_bin, mat, size, palette, class_names)


def _cube(size: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A cube spanning one voxel from the instance's corner, in the y-up frame: 24 vertices with flat normals."""
    positions, normals, indices = [], [], []
    for axis in range(3):
        for sign in (0, 1):
            n = np.zeros(3)
            n[axis] = 1 if sign else -1
            u, v = [a for a in range(3) if a != axis]
            quad = []
            for du, dv in ((0, 0), (1, 0), (1, 1), (0, 1)):
                p = np.zeros(3)
                p[axis], p[u], p[v] = sign, du, dv
                quad.append(p)
            base = len(positions)
            positions += quad
            normals += [n] * 4
            # Counter-clockwise seen from outside: flip the winding where (u, v, n) is left-handed.
            tri = [0, 1, 2, 0, 2, 3] if np.dot(np.cross(quad[1] - quad[0], quad[3] - quad[0]), n) > 0 else \
                [0, 2, 1, 0, 3, 2]
            indices += [base + t for t in tri]
    z_up = np.array(positions) * size
    return ((z_up @ TO_Y_UP.T).astype(np.float32), (np.array(normals) @ TO_Y_UP.T).astype(np.float32),
            np.array(indices, np.uint16))


def _write(translations: np.ndarray, colors: np.ndarray, cls: np.ndarray, material_bin: np.ndarray,
           mat: np.ndarray | None, size: float, palette: np.ndarray, class_names: Sequence[str]) -> bytes:
    blob = bytearray()
    views: list[dict] = []
    accessors: list[dict] = []

    def view(data: bytes, target: int | None = None) -> int:
        while len(blob) % 4:
            blob.append(0)
        entry = {"buffer": 0, "byteOffset": len(blob), "byteLength": len(data)}
        if target is not None:
            entry["target"] = target
        blob.extend(data)
        views.append(entry)
        return len(views) - 1

    def accessor(view_index: int, component: int, count: int, kind: str, offset: int = 0, **extra: object) -> int:
        accessors.append({"bufferView": view_index, "byteOffset": offset, "componentType": component,
                          "count": count, "type": kind, **extra})
        return len(accessors) - 1

    positions, normals, indices = _cube(size)
    position = accessor(view(positions.tobytes(), _ARRAY_BUFFER), _FLOAT, 24, "VEC3",
                        min=positions.min(0).tolist(), max=positions.max(0).tolist())
    normal = accessor(view(normals.tobytes(), _ARRAY_BUFFER), _FLOAT, 24, "VEC3")
    index = accessor(view(indices.tobytes(), _ELEMENT_ARRAY_BUFFER), _USHORT, 36, "SCALAR")
    translation_view = view(translations.tobytes())
    color_view = view(colors.tobytes())

    materials: list[dict] = []
    meshes: list[dict] = []
    mesh_of: dict[tuple[str, int], int] = {}

    def mesh(key: tuple[str, int], material: dict) -> int:
        if key not in mesh_of:
            materials.append(material)
            meshes.append({"name": f"{key[0]}_{key[1]}", "primitives": [
                {"attributes": {"POSITION": position, "NORMAL": normal}, "indices": index,
                 "material": len(materials) - 1}]})
            mesh_of[key] = len(meshes) - 1
        return mesh_of[key]

    def class_name(c: int) -> str:
        return str(class_names[c]) if 0 <= c < len(class_names) else f"class_{c}"

    def class_material(c: int) -> dict:
        rgb = srgb_to_linear(palette[c % len(palette)] / 255.0)
        return {"name": class_name(c), "pbrMetallicRoughness": {
            "baseColorFactor": [*np.round(rgb, 5).tolist(), 1.0], "metallicFactor": 0.0, "roughnessFactor": 0.85}}

    # extras.materials: whether `pbr` shows measured or predicted materials (else the class colours again).
    nodes: list[dict] = [{"name": "semantic", "children": []},
                         {"name": "pbr", "children": [], "extras": {"materials": mat is not None}}]
    groups = np.flatnonzero(np.r_[True, (np.diff(cls) != 0) | (np.diff(material_bin) != 0)])
    bounds = np.r_[groups, len(cls)]
    for start, end in itertools.pairwise(bounds):
        c, b, count = int(cls[start]), int(material_bin[start]), int(end - start)
        at = accessor(translation_view, _FLOAT, count, "VEC3", offset=12 * int(start))
        tint = accessor(color_view, _UBYTE, count, "VEC4", offset=4 * int(start), normalized=True)
        name = class_name(c)
        nodes[0]["children"].append(len(nodes))
        nodes.append({"name": name, "extras": {"class": name}, "mesh": mesh(("class", c), class_material(c)),
                      "extensions": {"EXT_mesh_gpu_instancing": {"attributes": {"TRANSLATION": at}}}})
        if mat is None:
            pbr_mesh = mesh(("class", c), class_material(c))
            attributes = {"TRANSLATION": at}
        else:
            rows = mat[start:end]
            pbr_mesh = mesh(("bin", b), {"name": f"metallic{b // ROUGHNESS_BINS}_roughness{b % ROUGHNESS_BINS}",
                                         "pbrMetallicRoughness": {
                                             "baseColorFactor": [1.0, 1.0, 1.0, 1.0],
                                             "metallicFactor": round(float(rows[:, 3].mean()), 4),
                                             "roughnessFactor": round(float(rows[:, 4].mean()), 4)}})
            attributes = {"TRANSLATION": at, "_COLOR_0": tint}
        nodes[1]["children"].append(len(nodes))
        nodes.append({"name": name, "extras": {"class": name}, "mesh": pbr_mesh,
                      "extensions": {"EXT_mesh_gpu_instancing": {"attributes": attributes}}})

    while len(blob) % 4:
        blob.append(0)
    tree = {
        "asset": {"version": "2.0", "generator": "interiorfusion_core.viewer"},
        "extensionsUsed": ["EXT_mesh_gpu_instancing"], "extensionsRequired": ["EXT_mesh_gpu_instancing"],
        "scene": 0, "scenes": [{"nodes": [0, 1]}], "nodes": nodes, "meshes": meshes, "materials": materials,
        "accessors": accessors, "bufferViews": views, "buffers": [{"byteLength": len(blob)}],
    }
    text = json.dumps(tree, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)
    total = 12 + 8 + len(text) + 8 + len(blob)
    return (struct.pack("<4sII", b"glTF", 2, total) + struct.pack("<I4s", len(text), b"JSON") + text
            + struct.pack("<I4s", len(blob), b"BIN\x00") + bytes(blob))
