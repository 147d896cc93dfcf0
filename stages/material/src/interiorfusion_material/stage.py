"""Stage 3: train the material flow on the VAE's material latents over the true geometry, then sample held-out
rooms' materials and score them against the truth and three references; finally texture stage 2's generated rooms.

Outputs (under the stage's output prefix):
    checkpoints/step-XXXXXXXX/   the engine's checkpoints; the last holds a single-file model.safetensors
    generation.json              what generation needs beside the weights (latent width, resolutions, sampler)
    frozen/<name>.safetensors    random-initialised frozen condition encoders (test and smoke configs only)
    eval.json                    per held-out sample and in the mean, on the true geometry: material L1, albedo L1,
                                 metallic/roughness L1, normal angle, PSNR and LPIPS of the shaded views, for the
                                 trained flow, the untrained network, the mean material and the VAE reconstruction
    samples/<key>.glb, .png      held-out rooms generated end to end (stage 2's geometry, then materials), textured,
                                 and their material previews (albedo | roughness | metallic | normal | shaded)
    viewers/generated-<key>.html the same in 3D, generated | ground truth (docs/viewer.md; MLflow also gets
                                 viewers/step-<N>.html at each validation: materials on the true geometry)

Evaluation runs on every rank (ZeRO-3 gathers parameters collectively); rank 0 writes the reports.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from interiorfusion_core.contract import Stage, StageContext, StageResult
from interiorfusion_core.engine import Trainer
from interiorfusion_core.engine.callbacks import Callback
from interiorfusion_core.engine.distributed import Runtime
from interiorfusion_core.errors import UserError
from interiorfusion_data.viewer import batch_camera, publish_scenes, scene_pane
from interiorfusion_material.config import DiTMaterialConfig
from interiorfusion_material.generate import (
    MaterialGenerator,
    generation_info,
    sample_material_latents,
    texture_scenes,
)
from interiorfusion_material.losses import ViewPixels, composite, psnr, shade_pixels, view_pixels
from interiorfusion_material.model import MaterialModel
from interiorfusion_material.perceptual import build_lpips, check_lpips_weights, lpips_distance
from interiorfusion_material.task import MaterialData, MaterialTask, decode_on_true_geometry, latent_stats
from interiorfusion_structure.conditions import check_pretrained
from interiorfusion_structure.stage import load_final_weights, save_random_frozen, stack_pngs
from interiorfusion_structure.task import batch_to_device
from interiorfusion_vae.latents import open_latents
from interiorfusion_vae.stage import load_vae_output

log = logging.getLogger("interiorfusion_material")
METHODS = ("generated", "untrained", "mean_material", "vae_reconstruction")


class MaterialStage(Stage):
    config_model = DiTMaterialConfig

    def run(self, ctx: StageContext) -> StageResult:
        config: DiTMaterialConfig = ctx.config
        check_pretrained(config.model.conditioning)  # missing weights: one sentence now, not after a model build
        check_lpips_weights(config.lpips_weights, config.loss.perceptual.network)
        latents = ctx.inputs["latents"]
        structure_uri = ctx.inputs["structure"].uri
        vae = load_vae_output(latents.uri, "cpu", Path(ctx.work_dir))
        task = MaterialTask(config, latents, vae)
        trainer = Trainer(ctx, task, callbacks=[MaterialPreviews(config, latents, task)])
        result = trainer.fit()
        rt = trainer.rt
        metrics = dict(result.metrics)
        resolution = task.target_resolution()
        held = open_latents(latents, "train", resolution)
        info = generation_info(config, task.latent_channels, held.compression, held.resolutions, resolution)
        if rt.is_main:
            ctx.output.put_json("generation.json", info)
            save_random_frozen(ctx, trainer.frozen, config)  # type: ignore[arg-type]
        model = load_trained(ctx, result.checkpoint, config, task.latent_channels, rt.device)
        gen = MaterialGenerator(model, trainer.frozen["vae"], task.encoders(), config,
                                {r: latent_stats(latents, r) for r in held.resolutions}, held.compression,
                                resolution, info)
        lpips_net = trainer.frozen.get("lpips") or build_lpips(config.lpips_weights, config.loss.perceptual.network)
        report = held_out_report(ctx, gen, latents, config, resolution, rt, lpips_net.to(rt.device))
        if report is not None:
            ctx.output.put_json("eval.json", report)
            metrics |= {f"heldout_{k}": v for k, v in report["metrics"].items()}
            ctx.tracker.log_metrics({f"heldout/{k}": v for k, v in report["metrics"].items()}, step=result.step)
        end_to_end(ctx, gen, structure_uri, latents, config, resolution, rt)
        return StageResult(metrics=metrics, outputs={"checkpoint": result.checkpoint})


def load_trained(ctx: StageContext, checkpoint: str, config: DiTMaterialConfig, latent_channels: int,
                 device: torch.device | str) -> MaterialModel:
    return load_final_weights(ctx, checkpoint, MaterialModel(config, latent_channels), device)


def untrained(gen: MaterialGenerator) -> MaterialGenerator:
    """The same network at its initialisation (the training seed): the baseline any learning must beat."""
    from interiorfusion_core.engine.trainer import isolated_rng

    with isolated_rng(gen.config.training.seed):
        model = MaterialModel(gen.config, gen.model.latent_channels)
    return MaterialGenerator(model.to(gen.device).eval(), gen.vae, gen.frozen, gen.config, gen.stats,
                             gen.compression, gen.resolution, gen.defaults)


# ------------------------------------------------------------------------------------------------ on true geometry
@torch.no_grad()
def materials_on_truth(gen: MaterialGenerator, batch: Mapping[str, Any], method: str,
                       baseline: MaterialGenerator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """([V, 8] materials on the batch's true voxels (its voxel order), [T, L] the normalised material latents
    they were decoded from) by `method` (METHODS, or `mean_latent`); `untrained` samples with `baseline` (built
    once by the caller; default: `untrained(gen)`)."""
    res = int(batch["resolution"])
    geometry = batch["geometry"].float()
    if method in ("generated", "untrained"):
        net = gen if method == "generated" else baseline or untrained(gen)
        x1 = sample_material_latents(net, batch, batch["coords"], batch["num_tokens"], geometry, 0.0, resolution=res)
    elif method == "vae_reconstruction":
        x1 = batch["feats"].float()
    else:  # mean material / mean latent: the mean latent's decode (mean material: its normals only)
        x1 = torch.zeros_like(batch["feats"], dtype=torch.float32)
    pred = decode_on_true_geometry(gen.vae, batch, gen.stats[res], x1)
    if method == "mean_material":
        prior = torch.sigmoid(gen.vae.decoder.material.material_prior.float())
        pred = torch.cat([prior.to(pred.device).expand(len(pred), 5), pred[:, 5:8]], 1)
    return pred, x1


def sample_scores(pred: torch.Tensor, truth: torch.Tensor, rows: torch.Tensor, pixels: list[ViewPixels],
                  lpips_net: nn.Module) -> dict[str, float]:
    """One sample's material errors on its voxels `rows` and its shaded views' PSNR and LPIPS."""
    p, t = pred[rows].float(), truth[rows].float()
    cos = torch.nn.functional.cosine_similarity(p[:, 5:8], t[:, 5:8], dim=1, eps=1e-6).abs().clamp(0, 1)
    out = {"material_l1": float((p[:, :5] - t[:, :5]).abs().mean()),
           "albedo_l1": float((p[:, :3] - t[:, :3]).abs().mean()),
           "metallic_roughness_l1": float((p[:, 3:5] - t[:, 3:5]).abs().mean()),
           "normal_deg": float(torch.rad2deg(torch.arccos(cos)).mean())}
    if pixels:
        shaded = [shade_pixels(px, pred) for px in pixels]
        stored = torch.cat([px.image.reshape(3, -1)[:, px.hit].T for px in pixels])
        out["render_psnr"] = psnr(torch.cat(shaded), stored)
        images = torch.stack([composite(px, s) for px, s in zip(pixels, shaded, strict=True)])
        out["render_lpips"] = float(lpips_distance(lpips_net, images, torch.stack([px.image for px in pixels])))
    return out


def held_out_report(ctx: StageContext, gen: MaterialGenerator, latents: Any, config: DiTMaterialConfig,
                    resolution: int, rt: Runtime, lpips_net: nn.Module) -> dict[str, Any] | None:
    """Materials of up to `eval.samples` held-out rooms on their true geometry, each method scored; rank 0 gets
    the report (None elsewhere, or when no split has samples)."""
    ev = config.eval
    records: list[dict[str, Any]] = []
    remaining = ev.samples
    baseline = untrained(gen)
    sheet: list[bytes] = []
    for split in ev.splits:
        try:
            held = MaterialData(latents, split, resolution, config.render.views)
        except UserError:
            continue
        indices = list(range(min(len(held), remaining)))
        remaining -= len(indices)
        for start in range(0, len(indices), config.training.batch_size):
            chunk = indices[start:start + config.training.batch_size]
            batch = batch_to_device(held.collate([held.sample(i) for i in chunk]), rt.device)
            outs = {m: materials_on_truth(gen, batch, m, baseline) for m in METHODS}
            preds = {m: p for m, (p, _) in outs.items()}
            mean_latent = materials_on_truth(gen, batch, "mean_latent")[0]
            truth = batch["voxel_feats"].float()
            true_latents = batch["feats"].float()
            pixels = view_pixels(batch, config.render.views, config.render.image_size)
            for b, i in enumerate(chunk):
                rows = (batch["voxel_coords"][:, 0] == b).nonzero().flatten()
                tokens = batch["coords"][:, 0] == b
                own = [p for p in pixels if p.sample == b]
                if not bool(batch["has_materials"][b]):
                    continue
                scores = {m: sample_scores(preds[m], truth, rows, own, lpips_net) for m in METHODS}
                for m, (_, x1) in outs.items():  # the flow's own error: sampled vs true latents (normalised)
                    scores[m]["latent_mse"] = float(((x1[tokens] - true_latents[tokens]) ** 2).mean())
                # How much the VAE's decode depends on its material latent at all (true vs mean latent): the most
                # any latent generator can move the materials of this room.
                effect = float((preds["vae_reconstruction"][rows, :5] - mean_latent[rows, :5]).abs().mean())
                records.append({"key": batch["keys"][b], "split": split, "index": i, "voxels": len(rows),
                                "vae_latent_effect": effect, **scores})
                if rt.is_main and len(sheet) < ev.log_samples:
                    png = preview(batch, b, preds["generated"], truth)
                    ctx.tracker.log_image(png, f"heldout/{batch['keys'][b]}_materials.png")
                    sheet.append(png)
    if not records:
        return None
    if rt.is_main and sheet:
        ctx.tracker.log_image(stack_pngs(sheet), "material_heldout.png")
    return summarize(records, resolution, config) if rt.is_main else None


def preview(batch: Mapping[str, Any], b: int, pred: torch.Tensor, truth: torch.Tensor) -> bytes:
    """Sample b's material previews from its condition camera: prediction above, truth below."""
    from interiorfusion_material.export import material_previews

    rows = (batch["voxel_coords"][:, 0] == b).nonzero().flatten()
    vox = batch["voxel_coords"][rows, 1:].cpu().numpy().astype(np.int64)
    H, W = batch["rgb"].shape[-2:]
    lights = batch["lights"][b, : int(batch["num_lights"][b])].float().cpu().numpy()
    return material_previews(vox, pred[rows].cpu().numpy(), batch["origin"][b].cpu().numpy(),
                             float(batch["voxel_size"][b]), batch["intrinsics"][b].cpu().numpy(),
                             batch["cam_to_world"][b].cpu().numpy(), int(H), int(W), lights,
                             truth=(vox, truth[rows].cpu().numpy()))


def summarize(records: list[dict[str, Any]], resolution: int, config: DiTMaterialConfig) -> dict[str, Any]:
    metrics: dict[str, float] = {}
    for method in METHODS:
        for name in records[0][method]:
            vals = [r[method][name] for r in records if np.isfinite(r[method].get(name, np.nan))]
            prefix = "" if method == "generated" else f"{method}_"
            metrics[f"{prefix}{name}"] = float(np.mean(vals)) if vals else float("nan")
    metrics["vae_latent_effect"] = float(np.mean([r["vae_latent_effect"] for r in records]))
    return {"resolution": resolution, "samples": len(records), "geometry": "true (the data's)",
            "lpips_backbone": "random (test/smoke config)" if config.lpips_weights.random_init else "imagenet",
            "metrics": metrics, "records": records}


# ------------------------------------------------------------------------------------------------ end to end
def end_to_end(ctx: StageContext, gen: MaterialGenerator, structure_uri: str, latents: Any,
               config: DiTMaterialConfig, resolution: int, rt: Runtime) -> None:
    """Held-out rooms generated from their condition view alone: stage 2's geometry, then materials; written as
    textured .glb with their previews."""
    from interiorfusion_material.export import material_previews, textured_glb
    from interiorfusion_structure.generate import generate_scenes, load_generator

    n = config.eval.end_to_end
    if n == 0:
        return
    structure = load_generator(structure_uri, rt.device, Path(ctx.work_dir))
    for split in config.eval.splits:
        try:
            held = MaterialData(latents, split, resolution, 1)
        except UserError:
            continue
        chunk = list(range(min(len(held), n)))
        if not chunk:
            continue
        batch = batch_to_device(held.collate([held.sample(i) for i in chunk]), rt.device)
        scenes = texture_scenes(gen, batch, generate_scenes(structure, batch))
        if rt.is_main:
            for b, scene in enumerate(scenes):
                key = batch["keys"][b]
                lights = batch["lights"][b, : int(batch["num_lights"][b])].float().cpu().numpy()
                H, W = batch["rgb"].shape[-2:]
                png = material_previews(scene.voxels, scene.materials, scene.origin, scene.voxel_size,
                                        batch["intrinsics"][b].cpu().numpy(), batch["cam_to_world"][b].cpu().numpy(),
                                        int(H), int(W), lights)
                if len(scene.voxels):
                    ctx.output.put_bytes(f"samples/{key}.glb", textured_glb(scene.voxels, scene.materials,
                                                                            scene.origin, scene.voxel_size,
                                                                            classes=scene.classes))
                ctx.output.put_bytes(f"samples/{key}.png", png)
                ctx.tracker.log_image(png, f"generated/{key}.png")
                rows = (batch["voxel_coords"][:, 0] == b).nonzero().flatten()
                cam = batch_camera(batch, b)
                panes = [scene_pane("ground truth", batch["voxel_coords"][rows], batch["voxel_labels"][rows],
                                    batch["origin"][b], float(batch["voxel_size"][b]),
                                    materials=batch["voxel_feats"][rows].float(), camera=cam)]
                if len(scene.voxels):
                    panes.insert(0, scene_pane("generated (structure, then materials)", scene.voxels, scene.classes,
                                               scene.origin, scene.voxel_size, materials=scene.materials, camera=cam))
                publish_scenes(ctx, f"generated-{key}", panes,
                               title=f"material · held-out {split} · {key}: generated end to end | ground truth")
        return


# ------------------------------------------------------------------------------------------------ validation
class MaterialPreviews(Callback):
    """At each validation: sample the first `eval.log_samples` held-out rooms' materials on their true geometry with
    the current weights and log their previews (albedo, roughness, metallic, normal, shaded; truth below) to MLflow.
    Every rank samples (ZeRO-3 gathers parameters collectively); rank 0 logs."""

    def __init__(self, config: DiTMaterialConfig, latents: Any, task: MaterialTask):
        self.config, self.latents, self.task = config, latents, task

    def on_validation(self, trainer: Trainer, step: int, metrics: Mapping[str, float]) -> None:
        n = self.config.eval.log_samples
        if n == 0:
            return
        try:
            data = MaterialData(self.latents, self.config.eval.splits[0], self.task.resolution,
                                self.config.render.views)
        except UserError:
            return
        if len(data) == 0:
            return
        model = trainer.module
        was_training = model.training
        res = self.task.resolution
        gen = MaterialGenerator(model, trainer.frozen["vae"], self.task.encoders(), self.config,
                                {res: latent_stats(self.latents, res)}, data.latents.compression, res)
        batch = trainer.task.to_device(data.collate([data.sample(i) for i in range(min(n, len(data)))]),
                                       trainer.rt.device)
        pred = materials_on_truth(gen, batch, "generated")[0]
        model.train(was_training)
        if trainer.rt.is_main:
            truth = batch["voxel_feats"].float()
            for b in range(len(batch["keys"])):
                trainer.tracker.log_image(preview(batch, b, pred, truth),
                                          f"materials/step-{step:08d}-{batch['keys'][b]}.png")
            # The first room in 3D at this step (MLflow only: the output keeps the end-to-end generations).
            rows = (batch["voxel_coords"][:, 0] == 0).nonzero().flatten()
            cam = batch_camera(batch, 0)
            coords, labels = batch["voxel_coords"][rows], batch["voxel_labels"][rows]
            panes = [scene_pane(label, coords, labels, batch["origin"][0], float(batch["voxel_size"][0]),
                                materials=feats[rows], camera=cam)
                     for label, feats in (("generated materials", pred), ("ground truth", truth))]
            publish_scenes(trainer.ctx, f"step-{step:08d}", panes, to_output=False,
                           title=f"material · step {step} · {batch['keys'][0]}: generated | ground truth "
                                 "(true geometry)")


__all__ = ["MaterialPreviews", "MaterialStage", "held_out_report", "materials_on_truth", "sample_scores"]
