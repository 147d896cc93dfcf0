"""Interactive 3D previews: one self-contained HTML page showing one or several .glb scenes side by side.

    pane = ViewerPane("ground truth", voxel_glb(...), camera=ConditionCamera(pose, K, w, h, png), metrics={...})
    html = viewer_html([truth, decoded], title="vae · val/scene_0003", palette=class_palette(PALETTE, CLASSES))
    publish_viewer(ctx, "val/scene_0003", html)   # <output>/viewers/….html and MLflow artifact viewers/….html

The page inlines three.js (tools/viewer, bundled at build time into viewer.min.js beside this file), the scenes
(base64 .glb) and the condition images, so it works offline and inside MLflow's artifact view (an iframe). Its
controls: orbit / pan / zoom with one camera linked across the panes, semantic colours vs PBR materials, the
condition camera's frustum with its input image (docs/viewer.md).
"""

from __future__ import annotations

import base64
import html
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from interiorfusion_core.viewer.glb import TO_Y_UP, voxel_glb

__all__ = [
    "MAX_VIEWER_BYTES",
    "ConditionCamera",
    "ViewerPane",
    "bundle_path",
    "class_palette",
    "publish_viewer",
    "viewer_html",
    "voxel_glb",
]

log = logging.getLogger(__name__)
BUNDLE = Path(__file__).with_name("viewer.min.js")
# A typical smoke scene's page (two panes, 64³) stays well under this; stages skip a larger page with a warning.
MAX_VIEWER_BYTES = 3 * 1024 * 1024
# OpenCV camera axes (x right, y down, z forward) → OpenGL/three.js (x right, y up, −z forward).
_CV_TO_GL = np.diag([1.0, -1.0, -1.0, 1.0])
_Z_UP_TO_Y_UP = np.eye(4)
_Z_UP_TO_Y_UP[:3, :3] = TO_Y_UP  # the scenes' frame change (glb.py), as a 4×4


class ViewerBundleMissing(RuntimeError):
    """The bundled JavaScript is not built (a checkout where `make setup` could not run npm)."""


def bundle_path() -> Path:
    return BUNDLE


@cache
def _bundle() -> str:
    if not BUNDLE.exists():
        raise ViewerBundleMissing(
            f"the 3D viewer's JavaScript is not built ({BUNDLE}); run `make setup` with Node.js and npm installed")
    return BUNDLE.read_text()


@dataclass(frozen=True)
class ConditionCamera:
    """The camera a scene was conditioned on: camera-to-world pose (OpenCV axes, the stages' z-up world),
    pinhole intrinsics K, image size, and the input image (PNG bytes) shown on its frustum."""

    pose: np.ndarray
    K: np.ndarray
    width: int
    height: int
    image_png: bytes | None = None

    def to_page(self) -> dict[str, Any]:
        K = np.asarray(self.K, np.float64)
        cam_to_world = _Z_UP_TO_Y_UP @ np.asarray(self.pose, np.float64).reshape(4, 4) @ _CV_TO_GL
        fov = 2 * np.degrees(np.arctan(self.height / (2 * K[1, 1])))
        aspect = (self.width / K[0, 0]) / (self.height / K[1, 1])
        page: dict[str, Any] = {"cam_to_world": np.round(cam_to_world, 6).reshape(-1).tolist(),
                                "fov_deg": round(float(fov), 4), "aspect": round(float(aspect), 6), "image": None}
        if self.image_png:
            page["image"] = "data:image/png;base64," + base64.b64encode(self.image_png).decode()
        return page


@dataclass(frozen=True)
class ViewerPane:
    label: str
    glb: bytes
    camera: ConditionCamera | None = None
    metrics: Mapping[str, float | str] = field(default_factory=dict)


def class_palette(colors: np.ndarray, names: Sequence[str]) -> dict[str, str]:
    """{class name: "#rrggbb"} from [C, 3] uint8 colours, for recolouring .glb files by mesh name."""
    colors = np.asarray(colors, np.uint8).reshape(-1, 3)
    return {str(n): "#{:02x}{:02x}{:02x}".format(*colors[i % len(colors)]) for i, n in enumerate(names)}


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
html, body {{ margin: 0; height: 100%; background: #1b1d22; color: #e8e8e8; font: 13px system-ui, sans-serif; }}
#app {{ display: flex; flex-direction: column; height: 100%; }}
#toolbar {{ display: flex; gap: 8px; align-items: center; padding: 6px 10px; background: #272a31; }}
#toolbar .title {{ flex: 1; font-weight: 600; overflow: hidden; white-space: nowrap; text-overflow: ellipsis; }}
#toolbar button {{ background: #3a3f4a; color: inherit; border: 1px solid #555; border-radius: 4px;
  padding: 4px 10px; cursor: pointer; }}
#stage {{ position: relative; flex: 1; min-height: 0; }}
#stage canvas {{ display: block; width: 100%; height: 100%; }}
.pane-label {{ position: absolute; top: 8px; pointer-events: none; text-shadow: 0 0 3px #000; }}
.pane-label .name {{ font-weight: 600; }}
.pane-label .metric {{ font-size: 12px; opacity: 0.85; }}
#viewer-error {{ color: #ff8080; padding: 12px; white-space: pre-wrap; }}
</style></head>
<body>
<script type="application/json" id="interiorfusion-scenes">{data}</script>
<script>{bundle}</script>
</body></html>
"""


def viewer_html(panes: Sequence[ViewerPane], *, title: str = "", palette: Mapping[str, str] | None = None,
                mode: str = "semantic", hidden: Sequence[str] = ("ceiling",)) -> str:
    """The page for `panes` (left to right): `palette` {class name: "#rrggbb"} recolours other .glb files by
    mesh name in semantic mode; classes in `hidden` start hidden (a button shows them: a room is seen from above
    with its ceiling off). Raises ViewerBundleMissing when the JavaScript is not built."""
    if not panes:
        raise ValueError("a viewer needs at least one scene")
    if mode not in ("semantic", "pbr"):
        raise ValueError(f"viewer mode must be 'semantic' or 'pbr', not {mode!r}")
    data = {
        "title": title, "mode": mode, "palette": dict(palette or {}), "hidden": list(hidden),
        "panes": [{"label": p.label, "glb": base64.b64encode(p.glb).decode(),
                   "metrics": {k: (float(v) if isinstance(v, int | float | np.floating) else str(v))
                               for k, v in p.metrics.items()},
                   "camera": p.camera.to_page() if p.camera else None} for p in panes],
    }
    # "</" cannot end the JSON's <script> element early once escaped; JSON reads "<\\/" as "</".
    text = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return _PAGE.format(title=html.escape(title or "InteriorFusion scenes"), data=text, bundle=_bundle())


def publish_viewer(ctx: Any, name: str, page: str | None, *, to_output: bool = True) -> str | None:
    """Write a page under the stage output (`viewers/<name>.html`; not with `to_output=False`, e.g. the pages of
    each validation) and log it as the MLflow artifact of the same path (the run's Artifacts tab shows it). Only
    the main rank writes. Returns the key, or None when the page is None or larger than MAX_VIEWER_BYTES (logged
    as a warning: a preview is never worth failing a run)."""
    if page is None or not ctx.is_main:
        return None
    data = page.encode()
    key = f"viewers/{name}.html"
    if len(data) > MAX_VIEWER_BYTES:
        log.warning("viewer %s is %.1f MB, over the %.0f MB limit: not written", key, len(data) / 2**20,
                    MAX_VIEWER_BYTES / 2**20)
        return None
    if to_output:
        ctx.output.put_bytes(key, data)
    ctx.tracker.log_text(page, key)
    return key


def stage_viewer(ctx: Any, name: str, panes: Sequence[ViewerPane], *, to_output: bool = True, **kwargs: Any
                 ) -> str | None:
    """`publish_viewer(ctx, name, viewer_html(panes, …))`, or a warning and None without the JavaScript bundle
    (a checkout without Node.js still trains)."""
    if not ctx.is_main:
        return None
    try:
        page = viewer_html(panes, **kwargs)
    except ViewerBundleMissing as exc:
        log.warning("%s: no 3D viewer written", exc)
        return None
    return publish_viewer(ctx, name, page, to_output=to_output)
