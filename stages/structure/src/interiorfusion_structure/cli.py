"""`interiorfusion generate`: a room from one image (and optionally its depth, layout and camera) with a trained
structure stage, written as a .glb with class materials and a preview PNG from the input camera."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from interiorfusion_core.cli import console, user_errors
from interiorfusion_core.errors import UserError

app = typer.Typer(help="Generate a 3D room from an image with a trained pipeline.", invoke_without_command=True,
                  no_args_is_help=True)


@app.callback()
@user_errors
def generate(
    source: Annotated[str, typer.Option("--from", help="A structure stage output, a pipeline run record "
                                        "(…/runs/<id>.json) or a pipeline prefix (its latest run).")],
    image: Annotated[Path, typer.Option("--image", help="The room's photo (PNG/JPEG).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the scene (.glb); the preview goes beside it.")],
    depth: Annotated[Path | None, typer.Option("--depth", help="Depth PNG (uint16 millimetres, 0 = none).")] = None,
    layout: Annotated[Path | None, typer.Option("--layout", help="SpatialLM-style layout.txt.")] = None,
    camera: Annotated[Path | None, typer.Option(
        "--camera", help="JSON with `intrinsics` (3×3, pixels of --image) and `cam_to_world` (4×4, OpenCV, metres "
        "in the voxel frame: origin at 0, z up); default: the training views' medoid camera.")] = None,
    steps: Annotated[int | None, typer.Option(help="ODE steps (default: the stage's sampling.steps).")] = None,
    sampler: Annotated[str | None, typer.Option(help="euler or heun.")] = None,
    cfg: Annotated[float | None, typer.Option(help="Classifier-free guidance scale.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
) -> None:
    """Generate one room and write OUT (.glb) and OUT with .png (input | generated classes | generated depth)."""
    import torch

    from interiorfusion_structure.generate import generate_scenes, load_generator, scene_glb, scene_preview

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    gen = load_generator(source, dev)
    batch = condition_batch(gen.defaults, image, depth, layout, camera, dev)
    updates: dict[str, Any] = {k: v for k, v in {"steps": steps, "occupancy_steps": steps, "method": sampler,
                                                 "cfg_scale": cfg, "seed": seed}.items() if v is not None}
    try:
        sampling = gen.config.sampling.model_copy(update=updates)
        type(sampling).model_validate(sampling.model_dump())
    except ValueError as exc:
        raise UserError(f"generate: invalid sampling options ({exc})") from None
    scene = generate_scenes(gen, batch, sampling)[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_bytes(scene_glb(scene))
    tmp.replace(out)  # never a half-written .glb under the final name
    preview = out.with_suffix(".png")
    preview.write_bytes(scene_preview(scene, batch, 0))
    console.print(f"wrote {out} ({len(scene.voxels)} voxels, {len(scene.cells)} latent cells at "
                  f"{scene.resolution}³, {scene.voxel_size * 100:.1f} cm voxels) and {preview}")


def _read_image(path: Path, what: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise UserError(f"--{what} {path}: no such file")
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"--{what} {path}: not an image this reader knows ({exc})") from None


def condition_batch(defaults: dict[str, Any], image: Path, depth: Path | None, layout: Path | None,
                    camera: Path | None, device: str) -> dict[str, Any]:
    """One sample's condition fields, as the structure task's collate would give them."""
    import numpy as np
    import torch

    W, H = defaults["image_size"]
    photo = _read_image(image, "image")
    src_w, src_h = photo.size
    rgb = np.asarray(photo.convert("RGB").resize((W, H)), np.float32) / 255.0
    if depth is not None:
        raw = np.asarray(_read_image(depth, "depth").resize((W, H), 0), np.float32)
        depth_m = raw / 1000.0
    else:
        depth_m = np.zeros((H, W), np.float32)
    if camera is not None:
        try:
            cam = json.loads(camera.read_text())
            K = np.asarray(cam["intrinsics"], np.float64).reshape(3, 3)
            pose = np.asarray(cam["cam_to_world"], np.float64).reshape(4, 4)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"--camera {camera}: expected JSON with intrinsics (3×3) and cam_to_world (4×4) "
                            f"({type(exc).__name__}: {exc})") from None
        K = K.copy()
        K[0] *= W / src_w  # the intrinsics are in --image pixels; the network sees the training image size
        K[1] *= H / src_h
    else:
        cam = defaults["camera"]
        K = np.asarray(cam["intrinsics"], np.float64)
        pose = np.asarray(cam["cam_to_world"], np.float64)
    text = layout.read_text() if layout is not None else ""
    f32 = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32, device=device)  # noqa: E731
    return {
        "keys": [image.stem], "rgb": f32(rgb).permute(2, 0, 1)[None], "depth": f32(depth_m)[None],
        "intrinsics": f32(K)[None], "cam_to_world": f32(pose)[None],
        "origin": torch.zeros(1, 3, device=device), "cube_size": f32([defaults["cube_size"]]),
        "voxel_size": f32([defaults["cube_size"] / defaults["resolution"]]),
        "layout_text": [text], "has_layout": torch.tensor([bool(text.strip())], device=device),
    }
