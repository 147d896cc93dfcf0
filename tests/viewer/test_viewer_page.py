"""The viewer page and its compact scene format without a browser: what voxel_glb writes (read back from its own
bytes), the glTF validator's verdict, the page's inlined data, its size on a smoke scene, the condition camera's
frame, a checkout without the JavaScript, and `interiorfusion view` on each kind of URI."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from testservers import BIN

from interiorfusion_core import viewer as viewer_module
from interiorfusion_core.errors import UserError
from interiorfusion_core.viewer import (
    MAX_VIEWER_BYTES,
    ConditionCamera,
    ViewerBundleMissing,
    ViewerPane,
    stage_viewer,
    viewer_html,
    voxel_glb,
)
from interiorfusion_core.viewer.glb import TO_Y_UP, srgb_to_linear, surface_mask

PALETTE = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], np.uint8)
NAMES = ("red", "green", "blue")


def read_glb(data: bytes) -> tuple[dict, bytes]:
    magic, version, total = struct.unpack_from("<4sII", data, 0)
    assert (magic, version, total) == (b"glTF", 2, len(data))
    json_len, kind = struct.unpack_from("<I4s", data, 12)
    assert kind == b"JSON"
    tree = json.loads(data[20:20 + json_len])
    bin_len, kind = struct.unpack_from("<I4s", data, 20 + json_len)
    assert kind == b"BIN\x00"
    return tree, data[28 + json_len:28 + json_len + bin_len]


def accessor_array(tree: dict, blob: bytes, index: int) -> np.ndarray:
    acc = tree["accessors"][index]
    view = tree["bufferViews"][acc["bufferView"]]
    dtype = {5126: np.float32, 5121: np.uint8, 5123: np.uint16}[acc["componentType"]]
    width = {"SCALAR": 1, "VEC3": 3, "VEC4": 4}[acc["type"]]
    start = view["byteOffset"] + acc.get("byteOffset", 0)
    return np.frombuffer(blob, dtype, acc["count"] * width, start).reshape(acc["count"], width)


def instances(tree: dict, blob: bytes, group: str) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Per class name under the top-level node `group`: (translations, instance colours or None)."""
    top = next(n for n in tree["nodes"] if n["name"] == group)
    out: dict[str, list] = {}
    for child in top["children"]:
        node = tree["nodes"][child]
        attrs = node["extensions"]["EXT_mesh_gpu_instancing"]["attributes"]
        t = accessor_array(tree, blob, attrs["TRANSLATION"])
        c = accessor_array(tree, blob, attrs["_COLOR_0"]) if "_COLOR_0" in attrs else None
        out.setdefault(node["extras"]["class"], []).append((t, c))
    return {k: (np.concatenate([t for t, _ in v]), None if v[0][1] is None else np.concatenate([c for _, c in v]))
            for k, v in out.items()}


def solid_block(n: int) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3)


def test_only_surface_voxels_are_kept_at_their_corners_in_y_up_metres() -> None:
    vox = solid_block(5)
    assert surface_mask(vox).sum() == 5**3 - 3**3
    classes = (vox[:, 0] >= 3).astype(np.int64)  # two classes split along x
    origin, size = np.array([1.0, -2.0, 0.5]), 0.1
    tree, blob = read_glb(voxel_glb(vox, origin, size, classes, PALETTE, NAMES))
    assert tree["extensionsRequired"] == ["EXT_mesh_gpu_instancing"]
    sem = instances(tree, blob, "semantic")
    assert set(sem) == {"red", "green"}
    surface = vox[surface_mask(vox)]
    for c, name in enumerate(("red", "green")):
        want = (origin + surface[(surface[:, 0] >= 3) == bool(c)] * size) @ TO_Y_UP.T
        got = sem[name][0]
        assert len(got) == len(want)
        np.testing.assert_allclose(np.sort(got, 0), np.sort(want, 0), atol=1e-5)
    # Without materials, PBR shows the class colours on the same instances.
    pbr = instances(tree, blob, "pbr")
    assert {k: len(v[0]) for k, v in pbr.items()} == {k: len(v[0]) for k, v in sem.items()}


def test_pbr_instances_carry_the_linear_albedo_and_binned_metal_roughness() -> None:
    vox = solid_block(4)
    rng = np.random.default_rng(0)
    mats = np.concatenate([rng.random((len(vox), 3)), (rng.random((len(vox), 1)) > 0.5), rng.random((len(vox), 1))],
                          1)
    tree, blob = read_glb(voxel_glb(vox, np.zeros(3), 1.0, np.zeros(len(vox), np.int64), PALETTE, NAMES,
                                    materials=mats))
    keep = surface_mask(vox)
    corners = {tuple(np.round(p, 4)): m for p, m in zip((vox[keep] * 1.0) @ TO_Y_UP.T, mats[keep], strict=True)}
    top = next(n for n in tree["nodes"] if n["name"] == "pbr")
    seen = 0
    for child in top["children"]:
        node = tree["nodes"][child]
        attrs = node["extensions"]["EXT_mesh_gpu_instancing"]["attributes"]
        t = accessor_array(tree, blob, attrs["TRANSLATION"])
        c = accessor_array(tree, blob, attrs["_COLOR_0"])
        material = tree["materials"][tree["meshes"][node["mesh"]]["primitives"][0]["material"]]
        pbr = material["pbrMetallicRoughness"]
        rows = np.array([corners[tuple(np.round(p, 4))] for p in t])
        np.testing.assert_allclose(c[:, :3] / 255.0, srgb_to_linear(rows[:, :3]), atol=1 / 255 + 1e-6)
        assert np.allclose(pbr["metallicFactor"], rows[:, 3].mean(), atol=1e-3)
        assert np.allclose(pbr["roughnessFactor"], rows[:, 4].mean(), atol=1e-3)
        assert len(set((rows[:, 4] * 4).astype(int).clip(0, 3))) == 1  # one roughness quarter per node
        seen += len(t)
    assert seen == keep.sum()


def test_a_scene_over_the_instance_budget_is_coarsened_not_truncated() -> None:
    vox = solid_block(16)
    tree, blob = read_glb(voxel_glb(vox, np.zeros(3), 0.5, np.zeros(len(vox), np.int64), PALETTE, NAMES,
                                    max_instances=400))
    t = instances(tree, blob, "semantic")["red"][0]
    assert len(t) == 8**3 - 6**3  # 16³ merged to 8³, its surface
    cube = accessor_array(tree, blob, tree["meshes"][0]["primitives"][0]["attributes"]["POSITION"])
    assert np.ptp(cube, 0).max() == pytest.approx(1.0)  # the cube is one coarse voxel (2 × 0.5 m)
    assert t.min(0).tolist() == pytest.approx([0.0, 0.0, -7.0])  # corners still cover the same extent


@pytest.mark.parametrize("bad", [np.zeros((0, 3)), np.zeros((4, 2))])
def test_bad_voxels_are_one_clear_error(bad: np.ndarray) -> None:
    with pytest.raises(UserError, match="voxels"):
        voxel_glb(bad, np.zeros(3), 1.0, np.zeros(len(bad)), PALETTE, NAMES)


def test_the_glb_passes_the_khronos_validator() -> None:
    from interiorfusion_material.export import validate_glb

    if shutil.which("node") is None:
        pytest.skip("no Node.js for the glTF-Validator")
    vox = solid_block(6)
    mats = np.full((len(vox), 8), 0.5)
    report = validate_glb(voxel_glb(vox, np.zeros(3), 0.2, vox[:, 2] % 3, PALETTE, NAMES, materials=mats))
    assert report["issues"]["numErrors"] == 0, report["issues"]["messages"][:5]


def test_the_condition_camera_looks_the_same_way_in_the_page() -> None:
    # OpenCV camera at (1, 2, 3) looking along world +x (z-up world); image 40×30, fy = 30.
    R = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], np.float64)  # columns: cam x, y, z in world
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = R, [1, 2, 3]
    K = np.array([[30.0, 0, 20], [0, 30.0, 15], [0, 0, 1]])
    page = ConditionCamera(pose, K, 40, 30).to_page()
    m = np.array(page["cam_to_world"]).reshape(4, 4)
    y_up = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]])
    np.testing.assert_allclose(m[:3, 3], y_up @ [1, 2, 3])
    np.testing.assert_allclose(m[:3, :3] @ [0, 0, -1], y_up @ [1, 0, 0], atol=1e-9)  # three.js looks down −z
    np.testing.assert_allclose(m[:3, :3] @ [0, 1, 0], y_up @ [0, 0, 1], atol=1e-9)  # and up is world up
    assert page["fov_deg"] == pytest.approx(2 * np.degrees(np.arctan(15 / 30)))
    assert page["aspect"] == pytest.approx(40 / 30)


def test_the_page_inlines_the_scenes_and_script_safely() -> None:
    glb = voxel_glb(solid_block(3), np.zeros(3), 1.0, np.zeros(27, np.int64), PALETTE, NAMES)
    page = viewer_html([ViewerPane("a </script><b>", glb, metrics={"fscore": 0.5})], title="t <i>",
                       palette={"red": "#c81e1e"})
    assert "http://" not in page.split('id="interiorfusion-scenes"')[0] and "<script src" not in page
    data = re.search(r'<script type="application/json" id="interiorfusion-scenes">(.*?)</script>', page, re.S)
    assert data is not None
    parsed = json.loads(data.group(1))
    assert parsed["panes"][0]["label"] == "a </script><b>"
    import base64

    assert base64.b64decode(parsed["panes"][0]["glb"]) == glb
    assert parsed["hidden"] == ["ceiling"] and parsed["palette"] == {"red": "#c81e1e"}
    assert "<title>t &lt;i&gt;</title>" in page


def test_a_smoke_scene_viewer_stays_under_three_megabytes(smoke_data: str) -> None:
    from interiorfusion_data.loader import open_dataset
    from interiorfusion_data.viewer import sample_pane, scenes_html

    ds = open_dataset(smoke_data, "val")
    sample = ds.get(0)
    page = scenes_html([sample_pane(sample, "truth"), sample_pane(sample, "again")])
    assert len(page.encode()) <= MAX_VIEWER_BYTES, len(page.encode()) / 2**20


def test_without_the_javascript_a_stage_skips_its_viewer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(viewer_module, "BUNDLE", tmp_path / "missing.js")
    viewer_module._bundle.cache_clear()
    try:
        glb = voxel_glb(solid_block(3), np.zeros(3), 1.0, np.zeros(27, np.int64), PALETTE, NAMES)
        with pytest.raises(ViewerBundleMissing, match="make setup"):
            viewer_html([ViewerPane("x", glb)])

        class Ctx:
            is_main = True
            output = tracker = None  # never touched

        assert stage_viewer(Ctx(), "x", [ViewerPane("x", glb)]) is None
        assert "no 3D viewer written" in caplog.text
    finally:
        viewer_module._bundle.cache_clear()


# ------------------------------------------------------------------------------------------------ the command
def view(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "interiorfusion"), "view", *args], capture_output=True, text=True, cwd=cwd,
                          env={"PATH": str(BIN), "HOME": str(cwd)}, timeout=300)


def test_view_writes_the_page_of_a_glb_a_stage_output_and_a_pipeline_record(smoke_data: str, tmp_path: Path
                                                                            ) -> None:
    glb = tmp_path / "room.glb"
    glb.write_bytes(voxel_glb(solid_block(4), np.zeros(3), 1.0, np.zeros(64, np.int64), PALETTE, NAMES))
    out = view(str(glb), cwd=tmp_path)  # no display: written beside the caller
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "room.html").exists() and "wrote" in out.stdout
    assert "interiorfusion-scenes" in (tmp_path / "room.html").read_text()

    out = view(smoke_data, "--output", str(tmp_path / "pages"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    page = (tmp_path / "pages/scenes.html").read_text()
    assert page == Path(smoke_data.removeprefix("file://"), "viewers/scenes.html").read_text()

    record = tmp_path / "runs" / "r1.json"
    record.parent.mkdir()
    record.write_text(json.dumps({"stages": {"rooms": smoke_data}}))
    out = view(record.as_uri(), "-o", str(tmp_path / "p.html"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "p.html").read_text() == page


@pytest.mark.parametrize(("args", "message"), [
    (["nowhere"], "not a .glb, a viewer page, a stage output"),
    (["missing.glb"], "no such file"),
    (["notglb.glb"], "not a binary glTF"),
])
def test_view_refuses_what_it_cannot_show_in_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    (tmp_path / "notglb.glb").write_text("hello")
    out = view(*args, cwd=tmp_path)
    assert out.returncode == 1
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.html"))
