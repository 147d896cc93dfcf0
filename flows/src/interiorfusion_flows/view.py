"""`interiorfusion view URI`: the 3D viewer of a stage output, a .glb, a viewer page or a pipeline run.

What URI can be (a local path, file:// or s3://):
- a `.glb` file: a page showing it (its meshes recoloured by class name in semantic mode);
- a `.html` viewer page (a stage's viewers/<name>.html);
- a stage output (a folder with manifest.json): one of its viewers/*.html (`--name`, default the one its manifest
  names, else the first); a data-stage output written before viewers existed gets a page built from its scenes;
- a pipeline run: the pipeline's folder (pipelines/<name>, its latest run) or a run record (runs/<id>.json); the
  viewer of `--stage` (an instance name), default the last instance with one.

The page opens in the local browser, or is written to `--output` (the default on a machine without a display).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import webbrowser
from dataclasses import dataclass
from pathlib import Path

from interiorfusion_core.errors import StorageError, UserError
from interiorfusion_core.manifest import MANIFEST_KEY, read_manifest
from interiorfusion_core.storage import ArtifactStore, open_store


@dataclass
class Found:
    name: str  # a short name for the page (its file name without .html)
    page: str
    choices: list[str]  # what else this URI offers (viewer keys or instance names), for the message


def _split(uri: str) -> tuple[ArtifactStore, str]:
    """(the store of the folder holding `uri`, the file name)."""
    head, _, name = uri.rstrip("/").rpartition("/")
    if not head:
        head = "/" if uri.startswith("/") else "."
    elif head.endswith(":/"):  # file:///scene.glb
        head += "/"
    return open_store(head), name


def _read(uri: str) -> bytes:
    store, name = _split(uri)
    try:
        if not store.exists(name):
            raise UserError(f"{uri}: no such file")
        return store.get_bytes(name)
    except StorageError as exc:
        raise UserError(f"{uri}: cannot be read ({exc})") from None


def glb_page(data: bytes, name: str) -> str:
    from interiorfusion_core.viewer import ViewerPane
    from interiorfusion_data.viewer import scenes_html

    if data[:4] != b"glTF":
        raise UserError(f"{name}: not a binary glTF (.glb) file")
    return scenes_html([ViewerPane(name, data)], title=name)


def stage_output_page(store: ArtifactStore, name: str | None) -> Found:
    manifest = read_manifest(store)
    viewers = sorted(k for k in manifest.artifacts if k.startswith("viewers/") and k.endswith(".html"))
    if name is not None:
        wanted = [k for k in viewers if k in (name, f"viewers/{name}", f"viewers/{name}.html")]
        if not wanted:
            listed = ", ".join(Path(k).stem for k in viewers) or "none"
            raise UserError(f"{store.uri}: no viewer named {name!r} (this {manifest.stage} output has: {listed})")
        key = wanted[0]
    elif viewers:
        named = [v for k, v in manifest.outputs.items() if k.startswith("viewer") and v in viewers]
        key = named[0] if named else viewers[0]
    elif manifest.stage == "data":
        return Found("scenes", data_page(store), [])
    else:
        glbs = sorted(k for k in manifest.artifacts if k.endswith(".glb"))
        if not glbs:
            raise UserError(f"{store.uri}: this {manifest.stage} output has no viewer pages and no .glb scenes")
        return Found(Path(glbs[0]).stem, glb_page(store.get_bytes(glbs[0]), Path(glbs[0]).name), glbs)
    page = store.get_bytes(key, manifest.artifacts[key].sha256).decode()
    return Found(Path(key).stem, page, [Path(k).stem for k in viewers])


def data_page(store: ArtifactStore) -> str:
    from interiorfusion_data.loader import open_dataset
    from interiorfusion_data.viewer import sample_pane, scenes_html

    for split in ("val", "test", "train"):
        try:
            ds = open_dataset(store, split)
        except UserError:
            continue
        if len(ds):
            panes = [sample_pane(ds.get(i), f"{split} · {ds.refs[i].key}") for i in range(min(2, len(ds)))]
            return scenes_html(panes, title=f"data · ground truth ({split})")
    raise UserError(f"{store.uri}: this data output has no scenes to show")


def pipeline_page(record: dict, where: str, stage: str | None, name: str | None) -> Found:
    stages: dict[str, str] = record.get("stages") or {}
    if not stages:
        raise UserError(f"{where}: this pipeline run record lists no stage outputs")
    if stage is not None:
        if stage not in stages:
            raise UserError(f"{where}: no stage instance {stage!r} in this run (it has: {', '.join(stages)})")
        found = stage_output_page(open_store(stages[stage]), name)
        return Found(f"{stage}-{found.name}", found.page, found.choices)
    for instance in reversed(list(stages)):
        try:
            found = stage_output_page(open_store(stages[instance]), name)
        except UserError:
            continue
        return Found(f"{instance}-{found.name}", found.page, list(stages))
    raise UserError(f"{where}: none of this run's stage outputs ({', '.join(stages)}) has a viewer")


def find_page(uri: str, stage: str | None = None, name: str | None = None) -> Found:
    """The viewer page URI points at (module docstring)."""
    text = uri.rstrip("/")
    lower = text.lower()
    if lower.endswith(".glb"):
        file_name = text.rpartition("/")[2]
        return Found(Path(file_name).stem, glb_page(_read(text), file_name), [])
    if lower.endswith(".html"):
        return Found(Path(text.rpartition("/")[2]).stem, _read(text).decode(), [])
    if lower.endswith(".json"):
        try:
            record = json.loads(_read(text))
        except json.JSONDecodeError as exc:
            raise UserError(f"{uri}: not a pipeline run record ({exc})") from None
        return pipeline_page(record, uri, stage, name)
    try:
        store = open_store(text)
        if store.exists(MANIFEST_KEY):
            if stage is not None:
                raise UserError(f"{uri}: --stage picks an instance of a pipeline run; this is one stage's output")
            return stage_output_page(store, name)
        if store.exists("runs/latest.json"):
            return pipeline_page(store.get_json("runs/latest.json"), f"{uri}/runs/latest.json", stage, name)
    except StorageError as exc:
        raise UserError(f"{uri}: cannot be read ({exc})") from None
    raise UserError(f"{uri}: not a .glb, a viewer page, a stage output (no manifest.json) or a pipeline "
                    "(no runs/latest.json)")


def has_display() -> bool:
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def show(found: Found, output: Path | None, open_browser: bool = True) -> tuple[Path, bool]:
    """Write the page (to `output`, else a temporary file when a browser can open it, else ./<name>.html) and open
    it in the local browser where there is one. Returns (the path, whether a browser was asked to open it)."""
    browser = open_browser and output is None and has_display()
    if output is None:
        output = (Path(tempfile.mkdtemp(prefix="interiorfusion-view-")) if browser else Path.cwd()) / \
            f"{found.name}.html"
    output = output if output.suffix == ".html" else output / f"{found.name}.html"
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial")
    tmp.write_text(found.page)
    tmp.replace(output)  # never a half-written page under the name asked for
    opened = False
    if browser:
        try:
            opened = webbrowser.open(output.resolve().as_uri())
        except webbrowser.Error:
            opened = False
    return output, opened
