"""`interiorfusion generate`: a room from one image (and optionally its depth, layout and camera). With a trained
material stage in the source (a material output, or a pipeline whose run has one) the room is textured: stage 2
generates the geometry, stage 3 its PBR materials, written as a .glb with texture-atlas materials and a material
preview PNG. With a structure stage alone, the .glb has one material per class, as stage 2 writes it."""

from __future__ import annotations

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
    source: Annotated[str, typer.Option("--from", help="A material or structure stage output, a pipeline run record "
                                        "(…/runs/<id>.json) or a pipeline prefix (its latest run).")],
    image: Annotated[Path, typer.Option("--image", help="The room's photo (PNG/JPEG).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the scene (.glb); the preview goes beside it.")],
    depth: Annotated[Path | None, typer.Option("--depth", help="Depth PNG (uint16 millimetres, 0 = none).")] = None,
    layout: Annotated[Path | None, typer.Option("--layout", help="SpatialLM-style layout.txt.")] = None,
    camera: Annotated[Path | None, typer.Option(
        "--camera", help="JSON with `intrinsics` (3×3, pixels of --image) and `cam_to_world` (4×4, OpenCV, metres "
        "in the voxel frame: origin at 0, z up); default: the training views' medoid camera.")] = None,
    steps: Annotated[int | None, typer.Option(help="ODE steps (default: each stage's sampling.steps).")] = None,
    sampler: Annotated[str | None, typer.Option(help="euler or heun.")] = None,
    cfg: Annotated[float | None, typer.Option(help="Classifier-free guidance scale (both stages).")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    untextured: Annotated[bool, typer.Option(help="Geometry only (class colours), even with a material stage.")
                          ] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
) -> None:
    """Generate one room and write OUT (.glb) and OUT with .png beside it."""
    import torch

    from interiorfusion_material.generate import load_material_generator, resolve_stage_uri, texture_scenes
    from interiorfusion_structure.generate import generate_scenes, load_generator, scene_glb, scene_preview
    from interiorfusion_structure.user_input import condition_batch

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    structure_uri = resolve_stage_uri(source, "structure")
    if structure_uri is None:
        raise UserError(f"{source}: has no structure stage output to generate geometry with")
    material_uri = None if untextured else resolve_stage_uri(source, "material")
    gen = load_generator(structure_uri, dev)
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
    preview = out.with_suffix(".png")
    if material_uri is None:
        glb, png = scene_glb(scene), scene_preview(scene, batch, 0)
        what = "class colours"
    else:
        from interiorfusion_material.export import material_previews, textured_glb

        mat = load_material_generator(material_uri, dev)
        m_updates = {k: v for k, v in updates.items() if k != "occupancy_steps"}
        m_sampling = mat.config.sampling.model_copy(update=m_updates)
        textured = texture_scenes(mat, batch, [scene], m_sampling)[0]
        if not len(textured.voxels):
            raise UserError("the generated scene has no voxels to write")
        glb = textured_glb(textured.voxels, textured.materials, textured.origin, textured.voxel_size,
                           classes=textured.classes)
        H, W = batch["rgb"].shape[-2:]
        lights = default_lights(textured)
        png = material_previews(textured.voxels, textured.materials, textured.origin, textured.voxel_size,
                                batch["intrinsics"][0].cpu().numpy(), batch["cam_to_world"][0].cpu().numpy(),
                                int(H), int(W), lights)
        what = "PBR materials"
    tmp = out.with_name(out.name + ".partial")
    tmp.write_bytes(glb)
    tmp.replace(out)  # never a half-written .glb under the final name
    preview.write_bytes(png)
    console.print(f"wrote {out} ({len(scene.voxels)} voxels, {len(scene.cells)} latent cells at {scene.resolution}³, "
                  f"{scene.voxel_size * 100:.1f} cm voxels, {what}) and {preview}")


def default_lights(scene: Any) -> Any:
    """One ceiling light over the room's centre for the preview's shaded tile (a generated room has no stored
    lights): 0.45 m below the top of its voxels, the data stage's single-light intensity."""
    import numpy as np

    pts = scene.points()
    centre = pts.mean(0)
    return np.array([[centre[0], centre[1], pts[:, 2].max() - 0.45, 1.6]], np.float32)
