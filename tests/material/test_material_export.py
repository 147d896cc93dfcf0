"""Textured .glb export of per-voxel PBR materials (read back by trimesh, checked by Khronos' glTF-Validator) and
the material preview sheet."""

from __future__ import annotations

import io
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from interiorfusion_core.errors import UserError
from interiorfusion_material.export import atlas_shape, material_previews, shaded_image, textured_glb, validate_glb

ORIGIN = np.array([1.0, -2.0, 0.5])
VOXEL = 0.1


def room(seed: int = 0, s: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 10s×8s floor slab with a 3s×2s×3s box on it (a 1 × 0.8 m floor at voxel size VOXEL / s); materials differ
    per voxel; classes floor (1) and box (6)."""
    floor = np.stack(np.meshgrid(np.arange(10 * s), np.arange(8 * s), np.arange(s), indexing="ij"), -1)
    box = np.stack(np.meshgrid(np.arange(3 * s, 6 * s), np.arange(2 * s, 4 * s), np.arange(s, 4 * s), indexing="ij"),
                   -1)
    floor, box = floor.reshape(-1, 3), box.reshape(-1, 3)
    voxels = np.concatenate([floor, box])
    rng = np.random.default_rng(seed)
    materials = rng.random((len(voxels), 8))
    normal = rng.normal(size=(len(voxels), 3)) + np.array([0.0, 0.0, 3.0])
    materials[:, 5:] = normal / np.linalg.norm(normal, axis=1, keepdims=True)
    materials[0, :3] = [1.3, -0.2, 0.5]  # out of range: clipped
    classes = np.array([1] * len(floor) + [6] * len(box))
    return voxels, materials, classes


def gltf_json(data: bytes) -> dict:
    length, kind = struct.unpack_from("<I4s", data, 12)
    assert data[:4] == b"glTF" and kind == b"JSON"
    return json.loads(data[20:20 + length])


def accessor(data: bytes, gltf: dict, index: int) -> np.ndarray:
    """An accessor's values straight from the .glb's binary chunk (tightly packed, as written)."""
    acc = gltf["accessors"][index]
    view = gltf["bufferViews"][acc["bufferView"]]
    json_length = struct.unpack_from("<I", data, 12)[0]
    start = 20 + json_length + 8 + view.get("byteOffset", 0) + acc.get("byteOffset", 0)
    dtype = {5126: np.float32, 5125: np.uint32}[acc["componentType"]]
    width = {"SCALAR": 1, "VEC2": 2, "VEC3": 3}[acc["type"]]
    return np.frombuffer(data, dtype, acc["count"] * width, start).reshape(acc["count"], width)


def texel(image: Image.Image, uv: np.ndarray) -> np.ndarray:
    """The texel under trimesh's (bottom-up) UVs, i.e. glTF's top-down v = 1 - uv[:, 1]."""
    arr = np.asarray(image.convert("RGB"))
    h, w = arr.shape[:2]
    col = np.floor(uv[:, 0] * w).astype(int)
    row = np.floor((1.0 - uv[:, 1]) * h).astype(int)
    return arr[row, col]


def expected_uint8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize("with_classes", [False, True])
def test_glb_has_the_exposed_faces_in_metres_and_one_texel_per_voxel(with_classes: bool) -> None:
    import trimesh

    voxels, materials, classes = room()
    data = textured_glb(voxels, materials, ORIGIN, VOXEL, classes=classes if with_classes else None,
                        class_names=["void", "floor", "wall", "ceiling", "table", "chair", "cabinet"])
    scene = trimesh.load(io.BytesIO(data), file_type="glb", process=False)
    assert isinstance(scene, trimesh.Scene)
    assert sorted(scene.geometry) == (["cabinet", "floor"] if with_classes else ["voxels"])

    # Bounds in metres, y up: (x, y, z) of the voxel frame ↦ (x, z, −y).
    lo = ORIGIN + voxels.min(0) * VOXEL
    hi = ORIGIN + (voxels.max(0) + 1) * VOXEL
    expected = np.array([[lo[0], lo[2], -hi[1]], [hi[0], hi[2], -lo[1]]])
    np.testing.assert_allclose(scene.bounds, expected, atol=1e-5)

    # Exposed faces only: 80 top + 80 bottom + 36 slab sides of the floor, 6 hidden under the box; the box's
    # 6 top + 18 + 12 sides.
    triangles = sum(len(g.faces) for g in scene.geometry.values())
    assert triangles == 2 * (80 + 80 - 6 + 36 + 6 + 18 + 12)

    gltf = gltf_json(data)
    assert len(gltf["materials"]) == 1 and len(gltf["images"]) == 2  # one atlas shared by the class meshes
    pbr = gltf["materials"][0]["pbrMetallicRoughness"]
    assert pbr["baseColorFactor"] == [1.0, 1.0, 1.0, 1.0]
    assert pbr["metallicFactor"] == 1.0 and pbr["roughnessFactor"] == 1.0
    assert gltf["samplers"] == [{"magFilter": 9728, "minFilter": 9728, "wrapS": 33071, "wrapT": 33071}]
    assert all(t["sampler"] == 0 for t in gltf["textures"])

    index = {tuple(v): i for i, v in enumerate(voxels.tolist())}
    checked = 0
    for mesh in scene.geometry.values():
        material = mesh.visual.material
        assert isinstance(material, trimesh.visual.material.PBRMaterial)
        assert material.baseColorTexture.size == atlas_shape(len(voxels))
        assert material.metallicRoughnessTexture.size == atlas_shape(len(voxels))
        # The voxel behind each triangle, from the geometry alone: half a voxel inside from its centroid.
        local = (mesh.triangles_center - ORIGIN) / VOXEL - 0.5 * mesh.face_normals
        owner = [index[tuple(v)] for v in np.floor(local).astype(int).tolist()]
        uv = mesh.visual.uv[mesh.faces]  # [F, 3, 2]: all three corners on the same texel centre
        np.testing.assert_allclose(uv, uv[:, :1].repeat(3, 1), atol=1e-7)
        base = texel(material.baseColorTexture, uv[:, 0])
        mr = texel(material.metallicRoughnessTexture, uv[:, 0])
        np.testing.assert_array_equal(base, expected_uint8(materials[owner, :3]))
        np.testing.assert_array_equal(mr[:, 1], expected_uint8(materials[owner, 4]))  # G = roughness
        np.testing.assert_array_equal(mr[:, 2], expected_uint8(materials[owner, 3]))  # B = metallic
        # The exported normals are the faces' own, not the predicted ones.
        np.testing.assert_allclose(mesh.vertex_normals[mesh.faces[:, 0]], mesh.face_normals, atol=1e-6)
        checked += len(mesh.faces)
    assert checked == triangles

    # The file itself, without trimesh's reading: glTF's UVs are top-down, texel centres of the owner's texel.
    prim = gltf["meshes"][0]["primitives"][0]
    position, uv = accessor(data, gltf, prim["attributes"]["POSITION"]), accessor(data, gltf,
                                                                                prim["attributes"]["TEXCOORD_0"])
    tri = accessor(data, gltf, prim["indices"]).reshape(-1, 3)
    corners = position[tri].astype(np.float64)
    normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    local = (corners.mean(1) - ORIGIN) / VOXEL - 0.5 * normal
    owner = np.array([index[tuple(v)] for v in np.floor(local).astype(int).tolist()])
    view = gltf["bufferViews"][gltf["images"][0]["bufferView"]]
    start = 20 + struct.unpack_from("<I", data, 12)[0] + 8 + view.get("byteOffset", 0)
    atlas = np.asarray(Image.open(io.BytesIO(data[start:start + view["byteLength"]])).convert("RGB"))
    h, w = atlas.shape[:2]
    col, row = uv[tri[:, 0], 0] * w - 0.5, uv[tri[:, 0], 1] * h - 0.5
    np.testing.assert_allclose(col, owner % w, atol=1e-4)
    np.testing.assert_allclose(row, owner // w, atol=1e-4)
    np.testing.assert_array_equal(atlas[owner // w, owner % w], expected_uint8(materials[owner, :3]))


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js (node) is not installed")
def test_khronos_validator_finds_no_errors() -> None:
    voxels, materials, classes = room(1)
    report = validate_glb(textured_glb(voxels, materials, ORIGIN, VOXEL, classes=classes))
    assert report["issues"]["numErrors"] == 0, report["issues"]["messages"]
    assert report["issues"]["numWarnings"] == 0, report["issues"]["messages"]
    assert report["info"]["hasTextures"] and report["info"]["materialCount"] == 1


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js (node) is not installed")
def test_validator_reports_broken_files() -> None:
    data = bytearray(textured_glb(*room()[:2], ORIGIN, VOXEL))
    tree = gltf_json(bytes(data))
    # A dangling texture reference: same JSON length (the index 9 replaces 0), so the chunk stays well formed.
    text = json.dumps(tree, separators=(",", ":")).replace('"baseColorTexture":{"index":0}',
                                                           '"baseColorTexture":{"index":9}')
    length = struct.unpack_from("<I", data, 12)[0]
    data[20:20 + length] = text.encode().ljust(length)
    assert validate_glb(bytes(data))["issues"]["numErrors"] > 0
    with pytest.raises(UserError, match="could not validate"):
        validate_glb(b"not a gltf file")


def test_empty_or_mismatched_input_is_a_user_error() -> None:
    with pytest.raises(UserError, match="no voxels"):
        textured_glb(np.zeros((0, 3), np.int64), np.zeros((0, 8)), ORIGIN, VOXEL)
    voxels, materials, _ = room()
    with pytest.raises(UserError, match="materials must be"):
        textured_glb(voxels, materials[:, :5], ORIGIN, VOXEL)
    with pytest.raises(UserError, match="unique"):
        textured_glb(np.concatenate([voxels, voxels[:1]]), np.concatenate([materials, materials[:1]]), ORIGIN,
                     VOXEL)


def test_atlas_is_the_smallest_power_of_two_rectangle() -> None:
    assert atlas_shape(1) == (1, 1)
    assert atlas_shape(5) == (4, 2)
    assert atlas_shape(16) == (4, 4)
    assert atlas_shape(17) == (8, 4)
    assert atlas_shape(20000) == (256, 128)


def camera(width: int = 96, height: int = 72) -> tuple[np.ndarray, np.ndarray]:
    from interiorfusion_data.render import intrinsics, look_at

    centre = ORIGIN + np.array([0.5, 0.4, 0.1])
    return intrinsics(width, height, 60.0), look_at(centre + np.array([-0.9, -1.1, 0.9]), centre)


def test_previews_tile_albedo_roughness_metallic_normal_and_shading() -> None:
    # Voxels of 2-3 pixels on screen: soft_render's splats cover them without gaps.
    voxels, materials, _ = room(s=3)
    voxel = VOXEL / 3
    uniform = materials.copy()
    uniform[:, :3] = [0.8, 0.3, 0.1]
    uniform[:, 3], uniform[:, 4] = 0.0, 0.6
    K, pose = camera()
    lights = np.array([[1.5, -1.5, 2.5, 6.0]])
    png = material_previews(voxels, uniform, ORIGIN, voxel, K, pose, 72, 96, lights, tile=80)
    sheet = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert sheet.shape == (60, 5 * 80, 3)
    albedo, rough, metal, normal, shaded = (sheet[:, 80 * i:80 * (i + 1)] for i in range(5))
    covered = np.abs(albedo - 255).sum(-1) > 30
    assert 0.1 < covered.mean() < 0.9  # the room is in view, with background around it
    # Fully covered pixels carry the uniform albedo (edges blend into the white background).
    colour = np.array([204, 77, 26])
    assert (np.abs(albedo[covered] - colour).max(-1) <= 2).mean() > 0.8
    assert (np.abs(rough[covered] - 153).max(-1) <= 2).mean() > 0.8
    assert (metal[covered].max(-1) <= 2).mean() > 0.8
    # Normals point mostly up (+z → blue above 0.5); the shaded tile differs from the flat albedo.
    assert np.median(normal[covered][:, 2]) > 200
    assert np.abs(shaded[covered] - colour).mean() > 5

    # With the truth: a second row of five tiles; the shaded tile is shaded_image's render.
    png = material_previews(voxels, uniform, ORIGIN, voxel, K, pose, 72, 96, lights, truth=(voxels, materials),
                            tile=96)
    sheet = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert sheet.shape == (2 * 72, 5 * 96, 3)
    assert not np.array_equal(sheet[:72, :96], sheet[72:, :96])  # truth's albedo differs per voxel
    shaded = shaded_image(voxels, materials, ORIGIN, voxel, K, pose, 72, 96, lights)
    assert shaded.shape == (72, 96, 3) and shaded.min() >= 0.0 and shaded.max() <= 1.0
    np.testing.assert_allclose(sheet[72:, 4 * 96:], np.round(shaded * 255), atol=1)


def test_validator_names_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from interiorfusion_material.export import VALIDATOR_DIR

    data = textured_glb(*room()[:2], ORIGIN, VOXEL)
    if shutil.which("node") is not None:  # node present, the npm package not installed there
        shutil.copy(VALIDATOR_DIR / "validate.mjs", tmp_path / "validate.mjs")
        monkeypatch.setenv("INTERIORFUSION_GLTF_VALIDATOR", str(tmp_path))
        with pytest.raises(UserError, match="npm ci --prefix tools/gltf-validator"):
            validate_glb(data)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="needs Node.js"):
        validate_glb(data)
