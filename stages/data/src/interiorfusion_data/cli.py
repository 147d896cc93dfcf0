"""`interiorfusion data synth|preview`: quick procedural datasets and contact sheets."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from interiorfusion_core.cli import console, user_errors
from interiorfusion_core.errors import UserError

app = typer.Typer(help="Scene data: synthesise procedural interiors, preview shards.", no_args_is_help=True)


@app.command("synth")
@user_errors
def synth(
    output: Annotated[str, typer.Argument(help="Where to write the dataset (a path, file:// or s3:// prefix).")],
    scenes: Annotated[int, typer.Option("--scenes", "-n", help="How many scenes.")] = 8,
    seed: Annotated[int, typer.Option(help="Dataset seed: the same seed gives the same bytes.")] = 0,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="A data config to start from.")] = None,
    resolution: Annotated[list[int] | None, typer.Option("--resolution", "-r", help="Occupancy level(s).")] = None,
    image_size: Annotated[int | None, typer.Option(help="Render size in pixels.")] = None,
    views: Annotated[int | None, typer.Option(help="Views per scene.")] = None,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 0,
    meshes: Annotated[bool, typer.Option("--meshes", help="Write .ply meshes instead of shards.")] = False,
) -> None:
    """Generate procedural interiors: shards + dataset.json (no stage manifest, no MLflow run), or meshes."""
    from interiorfusion_core.config import load_config
    from interiorfusion_core.storage import open_store
    from interiorfusion_data.config import DataStageConfig
    from interiorfusion_data.pipeline import write_dataset

    base = load_config(config, (), "data").model.model_dump() if config else {}
    base.update(source="procedural", seed=seed, num_scenes=scenes, num_workers=workers)
    if resolution:
        base.setdefault("voxel", {})["resolutions"] = resolution
    if image_size is not None:
        base.setdefault("render", {})["image_size"] = image_size
    if views is not None:
        base.setdefault("render", {})["views"] = views
    try:
        cfg = DataStageConfig.model_validate(base)
    except ValueError as exc:
        raise UserError(f"data synth: invalid options ({exc})") from None
    if meshes:
        _write_meshes(output, cfg)
        return
    store = open_store(output)
    with tempfile.TemporaryDirectory(prefix="interiorfusion-synth-") as work:
        summary = write_dataset(store, cfg, Path(work))
    m = summary.metrics
    console.print(f"wrote {int(m['scenes'])} scenes in {int(m['shards'])} shards → {store.uri}/dataset.json "
                  f"({m.get('seconds_per_scene', 0):.2f} s/scene)")


def _write_meshes(output: str, cfg: object) -> None:
    import trimesh

    from interiorfusion_data.pipeline import SceneSource

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    source = SceneSource(cfg)  # type: ignore[arg-type]
    for i in range(source.count):
        scene = source.scene(i)
        colors = (scene.face_material[:, :3] * 255).astype("uint8")
        mesh = trimesh.Trimesh(scene.vertices, scene.faces, face_colors=colors, process=False)
        mesh.export(out / f"{scene.name}.ply")
    console.print(f"wrote {source.count} meshes → {out}")


@app.command("preview")
@user_errors
def preview(
    uri: Annotated[str, typer.Argument(help="A data stage output or synth folder (path, file:// or s3://).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("data-preview.png"),
    split: Annotated[str, typer.Option(help="Which split.")] = "train",
    count: Annotated[int, typer.Option("--count", "-n", help="Samples (rows).")] = 4,
    resolution: Annotated[int | None, typer.Option(help="Voxel level to show (default: the finest).")] = None,
) -> None:
    """Write a contact sheet (RGB, depth, semantic, normal, voxels) of the first samples of a split."""
    from interiorfusion_data.preview import preview_dataset

    image = preview_dataset(uri, split, count, resolution)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    console.print(f"wrote {out} ({image.width}×{image.height})")
