"""The 3D viewers in a real browser (headless Chromium, SwiftShader's software WebGL), driven over DevTools: the
scene is drawn (non-background pixels in the canvas), the semantic / PBR toggle, the ceiling and the condition
camera change what is drawn, every stage's smoke viewer renders, and the MLflow UI's artifact page of a smoke
run shows its viewer inside its iframe."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from interiorfusion_core.contract import RunOutcome
from interiorfusion_core.manifest import read_manifest
from interiorfusion_core.storage import open_store
from interiorfusion_core.testing import Browser, chromium_binary, start_mlflow, stop
from interiorfusion_core.viewer import ConditionCamera, ViewerPane, bundle_path, viewer_html, voxel_glb

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(chromium_binary() is None, reason="no Chromium binary (Debian: apt-get install chromium)"),
    pytest.mark.skipif(not bundle_path().exists(), reason="the viewer's JavaScript is not built (make setup)"),
]
BACKGROUND = np.array([0x1B, 0x1D, 0x22])
READY = "window.interiorfusionViewer?.ready === true || !!document.body.dataset.error"
DOCS_SHOT = os.environ.get("INTERIORFUSION_VIEWER_SCREENSHOT")  # set to refresh docs/viewer.png


def canvas_pixels(browser: Browser) -> np.ndarray:
    """The canvas area of a screenshot, [H, W, 3] int."""
    rect = browser.evaluate("(() => { const r = document.querySelector('#stage canvas').getBoundingClientRect();"
                            " return [r.left, r.top, r.width, r.height]; })()")
    x, y, w, h = (round(v) for v in rect)
    shot = np.asarray(Image.open(io.BytesIO(browser.screenshot())).convert("RGB"), np.int64)
    return shot[y:y + h, x:x + w]


def drawn_fraction(pixels: np.ndarray) -> float:
    return float((np.abs(pixels - BACKGROUND).sum(-1) > 30).mean())


def changed_fraction(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.abs(a - b).sum(-1) > 30).mean())


def open_viewer(browser: Browser, url: str) -> float:
    started = time.perf_counter()
    browser.open(url, ready=READY, timeout=180)
    error = browser.evaluate("document.body.dataset.error || ''")
    assert not error, f"{url}: {error}; console: {browser.console()[-1000:]}"
    return time.perf_counter() - started


def click(browser: Browser, button: str) -> None:
    frames = browser.evaluate("window.interiorfusionViewer.frames")
    browser.evaluate(f"document.querySelector('#{button}').click()")
    browser.wait_for(f"window.interiorfusionViewer.frames > {frames}", timeout=60)


@pytest.fixture(scope="module")
def browser() -> Browser:
    with Browser(webgl=True, window=(1400, 900)) as b:
        yield b


def room(with_materials: bool = True) -> tuple[bytes, ConditionCamera]:
    """A 20×16×10 room: floor, two walls, a ceiling, a red-ish box; materials unlike the class colours."""
    grid = np.stack(np.meshgrid(np.arange(20), np.arange(16), np.arange(10), indexing="ij"), -1).reshape(-1, 3)
    x, y, z = grid.T
    floor, ceiling = z == 0, z == 9
    wall = ((x == 0) | (y == 15)) & ~floor & ~ceiling
    box = (x >= 8) & (x < 13) & (y >= 5) & (y < 9) & (z >= 1) & (z < 4)
    keep = floor | ceiling | wall | box
    vox = grid[keep]
    classes = np.select([floor[keep], ceiling[keep], wall[keep]], [2, 3, 1], 10)
    mats = np.zeros((len(vox), 5))
    mats[:, :3] = np.where(classes[:, None] == 10, [0.9, 0.8, 0.1], [0.35, 0.2, 0.1])
    mats[:, 4] = 0.6
    from interiorfusion_data.preview import PALETTE
    from interiorfusion_data.scene import CLASSES

    glb = voxel_glb(vox, np.zeros(3), 0.1, classes, PALETTE, CLASSES, materials=mats if with_materials else None)
    pose = np.eye(4)
    pose[:3, :3] = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]])  # looking along +y, z up
    pose[:3, 3] = [1.0, 0.2, 0.5]
    image = np.zeros((24, 32, 3), np.uint8)
    image[:, :, 0] = 255
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return glb, ConditionCamera(pose, np.array([[30.0, 0, 16], [0, 30, 12], [0, 0, 1]]), 32, 24, buf.getvalue())


def test_the_scene_is_drawn_and_every_toggle_changes_it(browser: Browser, tmp_path: Path) -> None:
    from interiorfusion_data.viewer import PAGE_PALETTE

    glb, cam = room()
    page = tmp_path / "room.html"
    page.write_text(viewer_html([ViewerPane("truth", glb, cam, {"fscore": 0.5}), ViewerPane("copy", glb, cam)],
                                title="room", palette=PAGE_PALETTE))
    seconds = open_viewer(browser, page.as_uri())
    semantic = canvas_pixels(browser)
    assert drawn_fraction(semantic) > 0.05, "the scene is not drawn"
    assert browser.evaluate("window.interiorfusionViewer.mode") == "semantic"
    click(browser, "toggle-colors")
    pbr = canvas_pixels(browser)
    assert browser.evaluate("window.interiorfusionViewer.mode") == "pbr"
    assert changed_fraction(semantic, pbr) > 0.02, "PBR materials look like the class colours"
    click(browser, "toggle-colors")
    assert changed_fraction(semantic, canvas_pixels(browser)) < 0.002, "toggling back is not the same picture"
    click(browser, "toggle-hidden")  # the ceiling covers the room from above
    assert changed_fraction(semantic, canvas_pixels(browser)) > 0.02
    click(browser, "toggle-hidden")
    click(browser, "toggle-frustum")
    assert changed_fraction(semantic, canvas_pixels(browser)) > 0.0005, "the condition camera was not drawn"
    # One camera for both panes: the two halves show the same picture.
    half = semantic.shape[1] // 2
    assert changed_fraction(semantic[:, :half], semantic[:, half:2 * half]) < 0.02
    print(f"viewer ready in {seconds:.1f} s")


def test_a_stage_glb_is_recoloured_by_class_name(browser: Browser, tmp_path: Path) -> None:
    """Any .glb (here the structure stage's exposed-face export): meshes named after classes get the palette."""
    from interiorfusion_data.viewer import PAGE_PALETTE
    from interiorfusion_structure.generate import GeneratedScene, scene_glb

    grid = np.stack(np.meshgrid(np.arange(12), np.arange(12), np.arange(4), indexing="ij"), -1).reshape(-1, 3)
    scene = GeneratedScene(np.zeros((0, 3)), grid, np.where(grid[:, 2] == 0, 2, 6), 32, np.zeros(3), 3.2)
    page = tmp_path / "stage.html"
    page.write_text(viewer_html([ViewerPane("stage glb", scene_glb(scene))], palette=PAGE_PALETTE))
    open_viewer(browser, page.as_uri())
    assert drawn_fraction(canvas_pixels(browser)) > 0.02


STAGES = ["smoke_data", "vae_smoke", "structure_smoke", "material_smoke", "evaluate_smoke"]


def stage_uri(outcome: object) -> str:
    if isinstance(outcome, str):
        return outcome
    if isinstance(outcome, tuple):
        outcome = outcome[0]
    assert isinstance(outcome, RunOutcome)
    return outcome.uri


@pytest.mark.parametrize("fixture", STAGES)
def test_every_stage_viewer_renders(fixture: str, request: pytest.FixtureRequest, browser: Browser) -> None:
    uri = stage_uri(request.getfixturevalue(fixture))
    manifest = read_manifest(uri)
    viewers = sorted(k for k in manifest.artifacts if k.startswith("viewers/"))
    assert viewers, f"{manifest.stage} wrote no viewer"
    store = open_store(uri)
    sizes = {k: manifest.artifacts[k].size for k in viewers}
    assert max(sizes.values()) <= 3 * 2**20, sizes
    path = Path(store.open_local(viewers[0]))
    seconds = open_viewer(browser, path.as_uri())
    pixels = canvas_pixels(browser)
    assert drawn_fraction(pixels) > 0.02, f"{manifest.stage}: nothing drawn"
    if browser.evaluate("window.interiorfusionViewer.hasMaterials"):
        click(browser, "toggle-colors")
        assert changed_fraction(pixels, canvas_pixels(browser)) > 0.005, f"{manifest.stage}: toggle changed nothing"
    else:
        assert manifest.stage == "structure"  # geometry only: no materials to switch to
        assert browser.evaluate("document.querySelector('#toggle-colors').disabled")
    if manifest.stage == "data" and DOCS_SHOT:
        click(browser, "toggle-colors")  # back to semantic for the picture
        Path(DOCS_SHOT).write_bytes(browser.screenshot())
    print(f"{manifest.stage}: {', '.join(f'{k} {v / 2**20:.2f} MB' for k, v in sizes.items())}; "
          f"ready in {seconds:.1f} s")


def test_training_stages_log_a_viewer_at_each_validation(structure_smoke: RunOutcome,
                                                         material_smoke: RunOutcome) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for outcome in (structure_smoke, material_smoke):
        run_id = outcome.manifest.mlflow_run_id
        assert run_id
        pages = [a.path for a in client.list_artifacts(run_id, "viewers")]
        steps = [p for p in pages if Path(p).name.startswith("step-")]
        assert len(steps) >= 2, (outcome.manifest.stage, pages)  # the smoke configs validate more than once
        assert any(not Path(p).name.startswith("step-") for p in pages)  # and the final held-out ones


def test_the_mlflow_artifact_page_shows_the_viewer(smoke_data: str, browser: Browser, tmp_path: Path) -> None:
    """The data stage's run in `mlflow server`'s UI: its viewers/scenes.html artifact opens in the UI's iframe,
    and the scene is drawn there."""
    from mlflow.tracking import MlflowClient

    from interiorfusion_core.tracking import tracking_uri, ui_path

    run_id = read_manifest(smoke_data).mlflow_run_id
    run = MlflowClient().get_run(run_id)
    db = Path(tracking_uri().removeprefix("sqlite:///"))
    # A server over the session's own store: its runs' artifacts are local folders it reads directly.
    root = tmp_path / "server"
    root.mkdir()
    (root / "mlflow.db").symlink_to(db)
    uri, proc = start_mlflow(root, ["--default-artifact-root", (tmp_path / "unused").as_uri()])
    try:
        route, query = ui_path(run.info.experiment_id, run_id).split("?")
        started = time.perf_counter()
        browser.open(f"{uri}/{route}/artifacts/viewers/scenes.html?{query}", timeout=180)
        browser.wait_for("!!document.querySelector('iframe.mlflow-html-iframe')", timeout=120)
        frame = wait_for_frame_ready(browser, timeout=180)
        rect = browser.evaluate("(() => { const r = document.querySelector('iframe.mlflow-html-iframe')"
                                ".getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; })()")
        x, y, w, h = (round(v) for v in rect)
        assert w > 200 and h > 200, rect
        shot = np.asarray(Image.open(io.BytesIO(browser.screenshot())).convert("RGB"), np.int64)[y:y + h, x:x + w]
        assert drawn_fraction(shot) > 0.05, "the viewer's scene is not drawn inside the MLflow UI"
        if DOCS_SHOT:
            Path(DOCS_SHOT).with_name("viewer-mlflow.png").write_bytes(browser.screenshot())
        print(f"MLflow artifact page: viewer ready in {time.perf_counter() - started:.1f} s (session {frame})")
    finally:
        stop(proc)


def wait_for_frame_ready(browser: Browser, timeout: float) -> str:
    """The session of the page's iframe whose document says the viewer is ready (the UI's iframe is sandboxed, so
    Chromium renders it in a process of its own: it is reached as its own DevTools target)."""
    deadline = time.monotonic() + timeout
    probe = "document.body ? (document.body.dataset.error || document.body.dataset.ready || '') : ''"
    while time.monotonic() < deadline:
        for session in browser.frame_sessions():
            try:
                value = browser.evaluate_in(session, probe)
            except RuntimeError:
                continue
            if value == "1":
                return session
            assert not value, f"the viewer failed inside the MLflow UI: {value}"
        time.sleep(0.5)
    raise AssertionError(f"no viewer became ready inside the MLflow UI within {timeout:.0f} s")
