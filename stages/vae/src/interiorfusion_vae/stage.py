"""Stage 1: train the SLAT-Interior VAE, measure held-out reconstruction, then encode the whole dataset.

Outputs (under the stage's output prefix):
    checkpoints/step-XXXXXXXX/   the engine's checkpoints; the last holds a single-file model.safetensors
    latents/<split>/shard-NNNNNN.safetensors + .json   geometry and material latents (μ) with coordinates
    latents/index.json           splits, shards, latent layout
    eval.json                    held-out occupancy IoU and material L1, with the trivial baselines
"""

from __future__ import annotations

import os

from interiorfusion_core.contract import Stage, StageContext, StageResult
from interiorfusion_core.engine import Trainer
from interiorfusion_core.errors import UserError
from interiorfusion_data.loader import open_dataset
from interiorfusion_vae.config import VAEPretrainConfig
from interiorfusion_vae.evaluate import class_prior, evaluate_samples, preview, summarize
from interiorfusion_vae.latents import encode_dataset
from interiorfusion_vae.model import SLATInteriorVAE
from interiorfusion_vae.task import VAETask, build_vae, mean_material


class VAEStage(Stage):
    config_model = VAEPretrainConfig  # name, kind and inputs: VAEPretrainConfig.stage

    def run(self, ctx: StageContext) -> StageResult:
        config: VAEPretrainConfig = ctx.config
        if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
            # DeepSpeed re-gathers ZeRO-3 weights for backward through hooks on module outputs that are tensors,
            # tuples or dicts; the sparse modules return SparseTensors, so their weights would stay partitioned.
            raise UserError(
                "the VAE cannot train under DeepSpeed ZeRO-3 (its sparse modules return SparseTensors, whose "
                "weights ZeRO-3 cannot re-gather for backward); launch it with configs/accelerate_deepspeed_zero2.yaml"
            )
        data_uri = ctx.inputs["data"].uri
        result = Trainer(ctx, VAETask(config, data_uri)).fit()
        metrics = dict(result.metrics)
        outputs = {"checkpoint": result.checkpoint}
        if ctx.is_main:
            model = load_trained(ctx, result.checkpoint, config)
            resolution = final_resolution(config)
            held = open_dataset(data_uri, config.encode.eval_split)
            indices = list(range(min(len(held), config.encode.eval_samples)))
            records = evaluate_samples(model, data_uri, config, resolution, indices,
                                       mean_material(data_uri, resolution),
                                       majority_class=class_prior(data_uri, resolution))
            report = summarize(records, config, resolution)
            ctx.output.put_json("eval.json", report)
            metrics |= {f"heldout_{k}": v for k, v in report["metrics"].items()}
            ctx.tracker.log_metrics({f"heldout/{k}": v for k, v in report["metrics"].items()}, step=result.step)
            ctx.tracker.log_image(preview(model, data_uri, config, resolution), "vae_reconstruction.png")
            if config.encode.enabled:
                outputs["latents"] = encode_dataset(ctx, model, data_uri, config, resolution)
        return StageResult(metrics=metrics, outputs=outputs)


def final_resolution(config: VAEPretrainConfig) -> int:
    """The resolution the latents describe (model.target_resolution: the curriculum ends there)."""
    return config.model.target_resolution


def load_trained(ctx: StageContext, checkpoint: str, config: VAEPretrainConfig) -> SLATInteriorVAE:
    from safetensors.torch import load_file

    path = ctx.output.open_local(f"{checkpoint}/model.safetensors")
    model = build_vae(config)
    model.load_state_dict(load_file(str(path)))
    return model.eval()
