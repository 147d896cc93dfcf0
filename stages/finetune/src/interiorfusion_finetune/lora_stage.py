"""Stage 4a: LoRA fine-tuning of the Structure DiT on real scans ("InteriorFusion-Real").

The real scans come in as a data stage output (the ScanNet and HM3D importers). They are encoded here by the base
model's own VAE into latents under this output, normalised with the *base* latents' statistics (the fine-tuned
flow must live in the space the base model samples and denormalises in; the scans' own statistics are kept in the
index as `normalization_own`). The structure stage's losses then train peft LoRA adapters on both of its flows
(occupancy and latent) with the base frozen.

Outputs (under the stage's output prefix):
    latents/                     the real scans' latents (the VAE's latent format), read by the trainer
    checkpoints/step-XXXXXXXX/   the engine's checkpoints (base + adapters)
    adapters/structure/          peft's save_pretrained: adapter_model.safetensors + adapter_config.json
    merged/structure.safetensors the base weights with the adapters folded in (`lora.merge`), what
                                 `interiorfusion generate` loads from this output
    eval.json                    held-out flow losses of the real scans: tuned vs the base (adapters disabled)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from interiorfusion_core.contract import Stage, StageContext, StageResult
from interiorfusion_core.engine import Trainer
from interiorfusion_core.engine.distributed import barrier
from interiorfusion_core.engine.task import TrainTask
from interiorfusion_core.errors import UserError
from interiorfusion_core.stage import StageInput
from interiorfusion_finetune.adapters import adapters_disabled, merged_state_dict, save_adapters, wrap
from interiorfusion_finetune.config import FinetuneLoRAConfig
from interiorfusion_finetune.mixing import MixedLoader
from interiorfusion_structure.config import DiTStructureConfig, StructureEvalConfig
from interiorfusion_structure.generate import Generator, load_generator
from interiorfusion_structure.model import StructureModel
from interiorfusion_structure.task import StructureData, StructureLoader, StructureTask, batch_to_device

log = logging.getLogger("interiorfusion_finetune")
REAL_INDEX = "latents/index.json"
MERGED = "merged/structure.safetensors"
ADAPTERS = "adapters/structure"


class LoRATask(TrainTask):
    """The structure stage's losses on the real scans' latents, through adapters on the base network."""

    unit_name = "tokens"
    partition_at_init = False  # whole tensors: the base weights are loaded, peft zero-initialises its B matrices

    def __init__(self, ctx: StageContext, config: FinetuneLoRAConfig, base: Generator, base_latents: Any):
        self.ctx, self.config, self.base, self.base_latents = ctx, config, base, base_latents
        self.structure_config = tuned_structure_config(base.config, config)
        self.inner: StructureTask | None = None

    # ---- data: the real scans, encoded once per run by the base VAE (a collective)
    def prepare(self, runtime: Any) -> None:
        from interiorfusion_vae.config import VAEPretrainConfig
        from interiorfusion_vae.latents import check_data_resolutions, encode_dataset

        vae_manifest = self.base_latents.manifest
        vae_config = VAEPretrainConfig.model_validate(vae_manifest.config)
        data_uri = self.ctx.inputs["data"].uri
        check_data_resolutions(data_uri, vae_config)
        vae = self.base.vae.to(runtime.device).eval()
        encode_dataset(self.ctx.output, vae, data_uri, vae_config, work_dir=Path(self.ctx.work_dir), rt=runtime,
                       device=runtime.device)
        if runtime.is_main:
            self.ctx.output.put_json(REAL_INDEX, base_normalised(self.ctx.output.get_json(REAL_INDEX),
                                                                 self.base_latents))
        barrier(runtime)
        self.latents = StageInput("latents", self.ctx.output.uri, None, self.ctx.output)  # type: ignore[arg-type]
        self.data_uri = data_uri
        self.inner = StructureTask(self.structure_config, self.latents, self.base.vae, data_uri)

    @property
    def task(self) -> StructureTask:
        if self.inner is None:
            raise RuntimeError("LoRATask.prepare has not run")
        return self.inner

    # ---- model: the base weights, wrapped
    def build_model(self, config: Any) -> nn.Module:
        model = StructureModel(self.structure_config, self.task.latent_channels)
        model.load_state_dict(self.base.model.state_dict())
        return wrap(model, self.config.lora, "structure")

    def frozen_models(self, config: Any) -> Mapping[str, nn.Module]:
        # The base run's frozen encoders as they are (random-init ones were saved by it: the exact weights).
        frozen: dict[str, nn.Module] = dict(self.base.frozen)
        if self.structure_config.loss.depth_guidance.weight > 0:
            frozen["vae"] = self.base.vae
        return frozen

    def make_loader(self, phase: Any, rank: int, world_size: int, seed: int) -> StructureLoader | MixedLoader:
        self.task.frozen = self.frozen
        real = self.task.make_loader(phase, rank, world_size, seed)
        if self.config.replay.weight <= 0:
            return real
        # Synthetic replay: the base run's training rooms, in the same normalised space (the base's statistics).
        replay = StructureLoader(StructureData(self.base_latents, "train", self.task.resolution),
                                 self.structure_config.training.batch_size, self.structure_config.max_tokens,
                                 shuffle=True, seed=seed + 1, rank=rank, world_size=world_size, random_views=True)
        return MixedLoader([real, replay], [self.config.data.weight, self.config.replay.weight], seed)

    def on_phase(self, phase: Any, model: nn.Module) -> None:
        self.task.on_phase(phase, model)

    def val_batches(self, rank: int, world_size: int) -> StructureLoader | None:
        return self.task.val_batches(rank, world_size)

    def train_step(self, step: Any) -> Mapping[str, torch.Tensor]:
        return self.task.train_step(step)  # stage 2's step (it keeps the step for its per-sample noise)

    def compute_losses(self, model: nn.Module, batch: Any) -> Mapping[str, torch.Tensor]:
        return self.task.compute_losses(model, batch)

    def count_units(self, batch: Any) -> int:
        return self.task.count_units(batch)

    def batch_size_of(self, batch: Any) -> int:
        return self.task.batch_size_of(batch)

    def to_device(self, batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
        return self.task.to_device(batch, device, dtype)


def tuned_structure_config(base: DiTStructureConfig, config: FinetuneLoRAConfig) -> DiTStructureConfig:
    """The base run's model, losses and flow law with this stage's training block and held-out splits (the model
    config must stay the base's: the adapters attach to exactly its layers)."""
    data = base.model_dump()
    data["training"] = config.training.model_dump()
    data["eval"] = StructureEvalConfig(splits=list(config.eval.splits), samples=0, log_samples=0).model_dump()
    data["model"]["conditioning"]["feature_cache"] = False  # the cache lives beside the base run's data
    return DiTStructureConfig.model_validate(data)


def base_normalised(index: dict[str, Any], base_latents: Any) -> dict[str, Any]:
    """The real latents' index with the base latents' normalisation per resolution (theirs kept as
    `normalization_own`): the tuned flow is trained and sampled in the base model's normalised space."""
    from interiorfusion_vae.latents import open_latents

    out = json.loads(json.dumps(index))
    for res, entry in out["resolutions"].items():
        base = open_latents(base_latents, "train", int(res))
        norm = base.info["resolutions"][str(res)]["normalization"]
        entry["normalization_own"] = entry["normalization"]
        entry["normalization"] = {**norm, "source": base.uri}
    return out


class LoRAStage(Stage):
    config_model = FinetuneLoRAConfig

    def run(self, ctx: StageContext) -> StageResult:
        config: FinetuneLoRAConfig = ctx.config
        structure_uri = ctx.inputs["structure"].uri
        base = load_generator(structure_uri, "cpu", Path(ctx.work_dir))
        if "material" in config.lora.models and "material" in ctx.inputs:
            log.warning("lora.models names material, but only the structure DiT is tuned: real scans carry no PBR "
                        "materials (ScanNet and HM3D samples have present.materials false), so the Material DiT's "
                        "losses have no targets on them")
        base_latents = _latents_input(structure_uri)
        task = LoRATask(ctx, config, base, base_latents)
        trainer = Trainer(ctx, task)
        result = trainer.fit()
        rt = trainer.rt
        metrics = dict(result.metrics)
        outputs: dict[str, str] = {"checkpoint": result.checkpoint, "latents": REAL_INDEX}
        tuned = load_tuned(ctx, result.checkpoint, task)
        report = held_out_losses(tuned, task, config, rt.device)
        if rt.is_main:
            outputs |= write_tuned_structure(ctx, tuned, adapters=True, merged=config.lora.merge)
            preview = held_out_preview(tuned, task, base, rt.device)
            if preview is not None:
                ctx.tracker.log_image(preview, "lora_heldout.png")
            if report is not None:
                ctx.output.put_json("eval.json", report)
                metrics |= {f"heldout_{k}": v for k, v in report["metrics"].items()}
                ctx.tracker.log_metrics({f"heldout/{k}": v for k, v in report["metrics"].items()}, step=result.step)
        return StageResult(metrics=metrics, outputs=outputs)


def write_tuned_structure(ctx: StageContext, tuned: nn.Module, *, adapters: bool, merged: bool) -> dict[str, str]:
    """peft's adapters (`adapters`) and the full weights with them folded in (`merged`; a model without adapters
    is written as it is) under the output; returns the manifest outputs naming them."""
    from safetensors.torch import save_file

    outputs: dict[str, str] = {}
    if adapters:
        folder = Path(ctx.work_dir) / "adapters-structure"
        for path in save_adapters(tuned, folder):
            ctx.output.put_file(f"{ADAPTERS}/{path.relative_to(folder)}", path)
        outputs["structure_adapters"] = ADAPTERS
    if merged:
        local = Path(ctx.work_dir) / "merged-structure.safetensors"
        weights = merged_state_dict(tuned) if adapters else {
            k: v.detach().cpu().contiguous() for k, v in tuned.state_dict().items()}
        save_file(weights, str(local))
        ctx.output.put_file(MERGED, local)
        outputs["structure_weights"] = MERGED
    return outputs


def _latents_input(structure_uri: str) -> StageInput:
    """The base structure run's latents input (the VAE output): its VAE config and normalisation."""
    from interiorfusion_core.manifest import read_manifest
    from interiorfusion_core.storage import open_store

    latents_uri = read_manifest(open_store(structure_uri)).inputs["latents"].uri
    store = open_store(latents_uri)
    return StageInput("latents", latents_uri, read_manifest(store), store)


def load_tuned(ctx: StageContext, checkpoint: str, task: TrainTask) -> nn.Module:
    """The final checkpoint's base + adapters (the task's model), rebuilt on CPU: whole tensors, whatever the
    training's sharding."""
    from safetensors.torch import load_file

    path = ctx.output.get_file(f"{checkpoint}/model.safetensors", Path(ctx.work_dir) / "tuned.safetensors")
    model = task.build_model(task.config)
    model.load_state_dict(load_file(str(path)))
    path.unlink(missing_ok=True)
    return model.eval()


@torch.no_grad()
def held_out_preview(model: nn.Module, task: LoRATask, base: Generator, device: torch.device) -> bytes | None:
    """The first held-out real scan generated from its condition view by the tuned network (above) and the base
    (below, adapters disabled): condition image | scene | depth."""
    from interiorfusion_structure.generate import generate_scenes, scene_preview
    from interiorfusion_structure.stage import stack_pngs

    res = task.task.target_resolution()
    for split in task.config.eval.splits:
        try:
            data = StructureData(task.latents, split, res, task.data_uri)
        except UserError:
            continue
        if len(data) == 0:
            continue
        batch = batch_to_device(data.collate([data.sample(0)]), device)
        gen = Generator(model.to(device).eval(), base.vae.to(device), {k: v.to(device) for k, v in base.frozen.items()},
                        base.config, {res: base.stats[res]}, base.compression, res)
        tuned = generate_scenes(gen, batch)[0]
        with adapters_disabled(model):
            untuned = generate_scenes(gen, batch)[0]
        return stack_pngs([scene_preview(tuned, batch, 0), scene_preview(untuned, batch, 0)])
    return None


@torch.no_grad()
def held_out_losses(model: nn.Module, task: LoRATask, config: FinetuneLoRAConfig, device: torch.device
                    ) -> dict[str, Any] | None:
    """Per held-out split: the structure losses of the real scans for the tuned network and for the same network
    with its adapters disabled (the base), on the same samples, views and noise (eval mode: `eval.draws` fixed
    noise and timestep draws per sample, averaged)."""
    model = model.to(device).eval()
    res = task.task.target_resolution()
    out: dict[str, Any] = {"resolution": res, "splits": {}, "metrics": {}}
    remaining = config.eval.samples
    sums: dict[str, list[float]] = {}
    for split in config.eval.splits:
        try:
            data = StructureData(task.latents, split, res, task.data_uri)
        except UserError:
            continue
        n = min(len(data), remaining)
        if n == 0:
            continue
        remaining -= n
        rows = []
        for start in range(0, n, config.training.batch_size):
            chunk = range(start, min(n, start + config.training.batch_size))
            batch = batch_to_device(data.collate([data.sample(i) for i in chunk]), device)
            tuned: dict[str, float] = {}
            base: dict[str, float] = {}
            for draw in range(config.eval.draws):
                task.task.eval_draw = draw
                for k, v in task.task.compute_losses(model, batch).items():
                    tuned[k] = tuned.get(k, 0.0) + float(v) / config.eval.draws
                with adapters_disabled(model):
                    for k, v in task.task.compute_losses(model, batch).items():
                        base[k] = base.get(k, 0.0) + float(v) / config.eval.draws
            task.task.eval_draw = 0
            rows.append({"samples": len(batch["keys"]), "keys": list(batch["keys"]), "tuned": tuned, "base": base})
        out["splits"][split] = rows
        for r in rows:
            for who in ("tuned", "base"):
                for k, v in r[who].items():
                    sums.setdefault(f"{'' if who == 'tuned' else 'base_'}{k}", []).extend([v] * r["samples"])
    if not sums:
        return None
    out["metrics"] = {k: sum(v) / len(v) for k, v in sums.items()}
    return out


__all__ = ["LoRAStage", "LoRATask", "base_normalised", "held_out_losses", "load_tuned", "tuned_structure_config",
           "write_tuned_structure"]
