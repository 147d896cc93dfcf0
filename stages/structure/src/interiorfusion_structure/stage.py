"""Stage 2: train the structure flows on the VAE's latents, then generate held-out rooms from their condition views
alone and score them in metres against the truth and three baselines.

Outputs (under the stage's output prefix):
    checkpoints/step-XXXXXXXX/   the engine's checkpoints; the last holds a single-file model.safetensors
    generation.json              what generation needs beside the weights (latent width, resolutions, default camera)
    frozen/<name>.safetensors    random-initialised frozen encoders (test and smoke configs only): the exact weights
    eval.json                    per held-out sample and in the mean: Chamfer (m) and F-score of generated scenes,
                                 beside the training set's mean scene, image-feature retrieval and the untrained model
    samples/<key>.glb, .png      the generated held-out scenes (class materials) and their previews
    viewers/heldout-<key>.html   the same in 3D, generated | ground truth (docs/viewer.md; MLflow also gets
                                 viewers/step-<N>.html at each validation)

Generation and evaluation run on every rank (ZeRO-3 gathers parameters collectively); rank r scores samples
r, r + W, ...; rank 0 writes the reports.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from interiorfusion_core.contract import Stage, StageContext, StageResult
from interiorfusion_core.engine import Trainer
from interiorfusion_core.engine.callbacks import Callback
from interiorfusion_core.engine.distributed import Runtime, gather_objects
from interiorfusion_core.errors import UserError
from interiorfusion_data.viewer import publish_scenes
from interiorfusion_structure.conditions import check_pretrained, retrieval_feature
from interiorfusion_structure.config import DiTStructureConfig
from interiorfusion_structure.generate import (
    Generator,
    generate_scenes,
    generation_info,
    scene_glb,
    scene_preview,
    scene_scores,
)
from interiorfusion_structure.model import StructureModel
from interiorfusion_structure.task import StructureData, StructureTask, batch_to_device, geometry_stats
from interiorfusion_vae.latents import open_latents
from interiorfusion_vae.stage import load_vae_output

log = logging.getLogger("interiorfusion_structure")


class StructureStage(Stage):
    config_model = DiTStructureConfig

    def run(self, ctx: StageContext) -> StageResult:
        config: DiTStructureConfig = ctx.config
        check_pretrained(config.model.conditioning)  # missing weights: one sentence now, not after a model build
        latents = ctx.inputs["latents"]
        vae = load_vae_output(latents.uri, "cpu", Path(ctx.work_dir))
        task = StructureTask(config, latents, vae)
        trainer = Trainer(ctx, task, callbacks=[ValidationSamples(config, latents, task)])
        result = trainer.fit()
        rt = trainer.rt
        metrics = dict(result.metrics)
        resolution = task.target_resolution()
        held = open_latents(latents, "train", resolution)
        info = generation_info(config, task.latent_channels, held.compression, held.resolutions, resolution,
                               default_camera(latents, resolution), *_image_frame(latents, resolution))
        if rt.is_main:
            ctx.output.put_json("generation.json", info)
            save_random_frozen(ctx, trainer.frozen, config)
        model = load_trained(ctx, result.checkpoint, config, task.latent_channels, rt.device)
        gen = Generator(model, trainer.frozen["vae"] if "vae" in trainer.frozen else vae.to(rt.device),
                        {k: v for k, v in trainer.frozen.items() if k != "vae"}, config,
                        {r: geometry_stats(latents, r) for r in held.resolutions}, held.compression, resolution, info)
        report = held_out_report(ctx, gen, latents, config, resolution, rt)
        if report is not None:
            ctx.output.put_json("eval.json", report)
            metrics |= {f"heldout_{k}": v for k, v in report["metrics"].items()}
            ctx.tracker.log_metrics({f"heldout/{k}": v for k, v in report["metrics"].items()}, step=result.step)
        return StageResult(metrics=metrics, outputs={"checkpoint": result.checkpoint})


# ------------------------------------------------------------------------------------------------ weights
def load_trained(ctx: StageContext, checkpoint: str, config: DiTStructureConfig, latent_channels: int,
                 device: torch.device | str) -> StructureModel:
    return load_final_weights(ctx, checkpoint, StructureModel(config, latent_channels), device)


def load_final_weights(ctx: StageContext, checkpoint: str, model: torch.nn.Module, device: torch.device | str
                       ) -> Any:
    """`model` with the single-file weights of the run's last checkpoint (model.safetensors), on `device`, eval."""
    from safetensors.torch import load_file

    path = ctx.output.get_file(f"{checkpoint}/model.safetensors", Path(ctx.work_dir) / "final.safetensors")
    model.load_state_dict(load_file(str(path)))
    path.unlink(missing_ok=True)
    return model.to(device).eval()


def save_random_frozen(ctx: StageContext, frozen: Mapping[str, torch.nn.Module], config: DiTStructureConfig) -> None:
    """A random-initialised frozen encoder (tests, smoke) is part of the result: generation must see the same
    weights, and no later process can re-draw them."""
    from safetensors.torch import save_file

    cond = config.model.conditioning
    random = {"image": cond.image_encoder.random_init, "semantic": cond.semantic_encoder.random_init}
    for name, module in frozen.items():
        if name == "vae" or not random.get(name, False):
            continue
        path = Path(ctx.work_dir) / f"frozen-{name}.safetensors"
        save_file({k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}, str(path))
        ctx.output.put_file(f"frozen/{name}.safetensors", path)


# ------------------------------------------------------------------------------------------------ defaults
def default_camera(latents: Any, resolution: int, samples: int = 64) -> dict[str, Any]:
    """The camera `interiorfusion generate` assumes when given none: the medoid of the training views' positions
    (in the voxel frame, origin at 0), its rotation and intrinsics as they are, intrinsics per image size."""
    data = StructureData(latents, "train", resolution)
    poses, Ks, sizes = [], [], []
    for i in range(min(len(data), samples)):
        s = data.sample(i)
        c = s["cond"]
        origin = np.asarray(s["latent"]["origin"], np.float64)
        for pose, K in zip(np.asarray(c["cam_to_world"]), np.asarray(c["intrinsics"]), strict=True):
            p = np.array(pose, np.float64)
            p[:3, 3] -= origin
            poses.append(p)
            Ks.append(np.array(K, np.float64))
            sizes.append(c["rgb"].shape[1:3])  # (V, H, W, 3)
    positions = np.stack([p[:3, 3] for p in poses])
    medoid = int(np.argmin(((positions[:, None] - positions[None]) ** 2).sum(-1).sum(1)))
    H, W = sizes[medoid]
    return {"cam_to_world": poses[medoid].tolist(), "intrinsics": Ks[medoid].tolist(), "image_size": [int(W), int(H)],
            "frame": "voxel frame, origin at 0 (metres), z up"}


def _image_frame(latents: Any, resolution: int) -> tuple[list[int], float, str]:
    data = StructureData(latents, "train", resolution)
    s = data.sample(0)
    H, W = s["cond"]["rgb"].shape[1:3]  # (V, H, W, 3)
    frame = s["latent"]["frame"]
    return [int(W), int(H)], float(frame.cube_size), str(getattr(frame, "kind", "metric"))


# ------------------------------------------------------------------------------------------------ evaluation
class ValidationSamples(Callback):
    """At each validation: generate the first `eval.log_samples` held-out scenes with the current weights and log
    their previews to MLflow (every rank generates: ZeRO-3 gathers parameters collectively)."""

    def __init__(self, config: DiTStructureConfig, latents: Any, task: StructureTask):
        self.config, self.latents, self.task = config, latents, task

    def on_validation(self, trainer: Trainer, step: int, metrics: Mapping[str, float]) -> None:
        n = self.config.eval.log_samples
        if n == 0:
            return
        try:
            data = StructureData(self.latents, self.config.eval.splits[0], self.task.resolution)
        except UserError:  # no held-out split at this resolution: nothing to show
            return
        if len(data) == 0:
            return
        vae = trainer.frozen.get("vae")
        if vae is None:
            return
        model = trainer.module
        was_training = model.training
        held = data.latents
        res = self.task.resolution
        gen = Generator(model, vae, {k: v for k, v in trainer.frozen.items() if k != "vae"}, self.config,
                        {res: geometry_stats(self.latents, res)}, held.compression, res)
        batch = trainer.task.to_device(data.collate([data.sample(i) for i in range(min(n, len(data)))]),
                                       trainer.rt.device)
        scenes = generate_scenes(gen, batch)
        model.train(was_training)
        if trainer.rt.is_main:
            for b, scene in enumerate(scenes):
                trainer.tracker.log_image(scene_preview(scene, batch, b),
                                          f"samples/step-{step:08d}-{batch['keys'][b]}.png")
            # The first held-out scene in 3D at this step (MLflow only: the output keeps the final one).
            publish_scenes(trainer.ctx, f"step-{step:08d}", generation_panes(scenes[0], true_scene(data, 0, res),
                                                                             batch, 0),
                           title=f"structure · step {step} · {batch['keys'][0]}: generated | ground truth",
                           to_output=False)


def held_out_report(ctx: StageContext, gen: Generator, latents: Any, config: DiTStructureConfig, resolution: int,
                    rt: Runtime) -> dict[str, Any] | None:
    """Generate up to `eval.samples` held-out scenes (of `eval.splits`, in order) from their condition views and
    score them; rank 0 gets the report (None elsewhere, or when no split has samples)."""
    ev = config.eval
    baselines: Baselines | None = None
    untrained: Generator | None = None
    records: list[dict[str, Any]] = []
    logged = position = 0
    remaining = ev.samples
    sheet: list[bytes] = []
    for split in ev.splits:
        try:
            held = StructureData(latents, split, resolution)
        except UserError:  # the VAE encoded no such split
            continue
        indices = list(range(min(len(held), remaining)))
        remaining -= len(indices)
        if not indices:
            continue
        baselines = baselines or Baselines(latents, resolution, gen, config)
        untrained = untrained or untrained_generator(gen, config, rt.device)
        # Every rank walks every batch (collectives inside the model under ZeRO-3) and keeps its own share.
        for start in range(0, len(indices), config.training.batch_size):
            chunk = indices[start:start + config.training.batch_size]
            batch = batch_to_device(held.collate([held.sample(i) for i in chunk]), rt.device)
            scenes = generate_scenes(gen, batch)
            raw = generate_scenes(untrained, batch)
            for b, i in enumerate(chunk):
                order = position
                position += 1
                show = rt.is_main and logged < ev.log_samples
                if i % rt.world_size != rt.rank and not show:
                    continue
                truth = true_scene(held, i, resolution)
                if show:
                    key = batch["keys"][b]
                    png = scene_preview(scenes[b], batch, b, truth=truth)
                    ctx.output.put_bytes(f"samples/{key}.glb", scene_glb(scenes[b]))
                    publish_scenes(ctx, f"heldout-{key}", generation_panes(scenes[b], truth, batch, b),
                                   title=f"structure · held-out {split} · {key}: generated | ground truth")
                    ctx.output.put_bytes(f"samples/{key}.png", png)
                    ctx.tracker.log_image(png, f"heldout/{key}.png")
                    sheet.append(png)
                    logged += 1
                if i % rt.world_size != rt.rank:
                    continue
                pts, frame = truth.points(), held.latents.frame(i)

                def score(pred: Any, pts: np.ndarray = pts) -> dict[str, float]:
                    return scene_scores(pred, pts, ev.fscore_thresholds, ev.max_points)

                records.append({
                    "key": batch["keys"][b], "split": split, "index": i, "order": order,
                    "voxels": len(scenes[b].voxels), "true_voxels": len(pts),
                    "generated": score(scenes[b]), "untrained": score(raw[b]),
                    "mean_scene": score(baselines.mean_scene(frame)),
                    "retrieval": score(baselines.retrieve(batch, b, frame)),
                })
    if untrained is None:
        return None
    if sheet:  # one overview image at the run's top level, like the VAE's reconstruction sheet
        ctx.tracker.log_image(stack_pngs(sheet), "structure_heldout.png")
    everyone = [r for rank in gather_objects(records, rt) for r in rank]
    return summarize(everyone, ev.fscore_thresholds, resolution) if rt.is_main else None


def stack_pngs(pngs: list[bytes]) -> bytes:
    """PNG images stacked top to bottom (the held-out previews as one sheet)."""
    import io

    from PIL import Image

    images = [Image.open(io.BytesIO(p)).convert("RGB") for p in pngs]
    sheet = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    y = 0
    for image in images:
        sheet.paste(image, (0, y))
        y += image.height
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def generation_panes(scene: Any, truth: Any, batch: Mapping[str, Any], b: int, label: str = "generated",
                     metrics: Mapping[str, float] | None = None) -> list[Any]:
    """Viewer panes of a generated scene | its ground truth (GeneratedScenes), with batch item b's condition
    camera and image on both."""
    from interiorfusion_data.viewer import batch_camera, scene_pane

    cam = batch_camera(batch, b)
    panes = []
    if len(scene.voxels):
        panes.append(scene_pane(label, scene.voxels, scene.classes, scene.origin, scene.voxel_size, camera=cam,
                                metrics={"voxels": len(scene.voxels), **(metrics or {})}))
    panes.append(scene_pane("ground truth", truth.voxels, truth.classes, truth.origin, truth.voxel_size, camera=cam,
                            metrics={"voxels": len(truth.voxels)}))
    return panes


def true_scene(held: StructureData, i: int, resolution: int) -> Any:
    """Held-out sample i's true voxels and classes as a GeneratedScene (same frame), for scores and previews."""
    from interiorfusion_structure.generate import GeneratedScene

    truth = held.data.get(int(held.latents.refs[i].index), resolution, fields=("voxels",))
    frame = held.latents.frame(i)
    coords = truth["coords"].astype(np.int64)
    labels = truth.get("labels")
    classes = np.zeros(len(coords), np.int64) if labels is None else labels.astype(np.int64)
    return GeneratedScene(np.zeros((0, 3), np.int64), coords, classes, resolution,
                          np.asarray(frame.origin, np.float64), float(frame.cube_size))


def summarize(records: list[dict[str, Any]], thresholds: list[float], resolution: int) -> dict[str, Any]:
    records = sorted(records, key=lambda r: r["order"])
    metrics: dict[str, float] = {}
    for method in ("generated", "untrained", "mean_scene", "retrieval"):
        for name in records[0][method]:
            vals = [r[method][name] for r in records if np.isfinite(r[method][name])]
            prefix = "" if method == "generated" else f"{method}_"
            metrics[f"{prefix}{name}"] = float(np.mean(vals)) if vals else float("inf")
    return {"resolution": resolution, "samples": len(records), "thresholds_m": thresholds, "metrics": metrics,
            "records": records}


def untrained_generator(gen: Generator, config: DiTStructureConfig, device: torch.device | str) -> Generator:
    """The same network at its initialisation (the training seed): the baseline any learning must beat."""
    from interiorfusion_core.engine.trainer import isolated_rng

    with isolated_rng(config.training.seed):
        model = StructureModel(config, gen.model.latent_channels)
    return Generator(model.to(device).eval(), gen.vae, gen.frozen, config, gen.stats, gen.compression,
                     gen.resolution, gen.defaults)


class Baselines:
    """What a generator must beat without learning anything from the image: the training set's mean scene (its
    most frequent voxels, as many as a training scene has on average), and retrieval of the training scene whose
    condition image is nearest by feature (the frozen image encoder's mean token, or the image itself when the
    config has no image encoder): a strong baseline on a small training set."""

    def __init__(self, latents: Any, resolution: int, gen: Generator, config: DiTStructureConfig,
                 samples: int = 64):
        train = StructureData(latents, "train", resolution)
        self.gen, self.resolution = gen, resolution
        self.scenes: list[np.ndarray] = []
        counts = np.zeros((resolution,) * 3, np.float64)
        feats = []
        n = min(len(train), samples)
        for i in range(n):
            coords = train.data.get(int(train.latents.refs[i].index), resolution, fields=("voxels",))["coords"]
            coords = coords.astype(np.int64)
            self.scenes.append(coords)
            counts[tuple(coords.T)] += 1
            batch = batch_to_device(train.collate([train.sample(i)]), gen.device)
            feats.append(retrieval_feature(gen.frozen, batch, 0))
        self.features = torch.stack(feats) if feats else None
        size = int(np.mean([len(s) for s in self.scenes])) if self.scenes else 0
        flat = np.argsort(-counts.reshape(-1), kind="stable")[:size]
        self.mean_cells = np.stack(np.unravel_index(flat, counts.shape), 1)

    def mean_scene(self, frame: Any) -> np.ndarray:
        vs = float(frame.cube_size) / self.resolution
        return np.asarray(frame.origin, np.float64) + (self.mean_cells + 0.5) * vs

    def retrieve(self, batch: Mapping[str, Any], b: int, frame: Any) -> np.ndarray:
        if self.features is None:
            return np.zeros((0, 3))
        f = retrieval_feature(self.gen.frozen, batch, b)
        best = int((self.features @ f).argmax())
        vs = float(frame.cube_size) / self.resolution
        return np.asarray(frame.origin, np.float64) + (self.scenes[best] + 0.5) * vs


__all__ = ["Baselines", "StructureStage", "ValidationSamples", "held_out_report", "load_trained", "summarize"]
