"""Stage 1: train the SLAT-Interior VAE, measure held-out reconstruction, then encode the whole dataset.

Outputs (under the stage's output prefix):
    checkpoints/step-XXXXXXXX/   the engine's checkpoints; the last holds a single-file model.safetensors
    latents/<N>/<split>/shard-rRRRRR-NNNNN.safetensors + .json   geometry and material latents (μ) with coordinates,
                                 per encode resolution N, one set of shards per rank (docs/latents.md)
    latents/index.json           resolutions, normalisation statistics, splits, shards, the join to the data
    eval.json                    held-out occupancy IoU and material L1, with the trivial baselines
    viewers/reconstruction.html  a held-out scene in 3D: input | free decode (docs/viewer.md)

After training, every rank loads the trained weights onto the training device; evaluation and encoding are
sharded across the ranks (rank r takes samples r, r + W, ...), rank 0 reduces and writes the reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from interiorfusion_core.contract import Stage, StageContext, StageResult
from interiorfusion_core.engine import Trainer
from interiorfusion_core.engine.distributed import Runtime, broadcast_object, gather_objects
from interiorfusion_data.loader import open_dataset
from interiorfusion_data.viewer import publish_scenes
from interiorfusion_vae.config import VAEPretrainConfig
from interiorfusion_vae.evaluate import class_prior, evaluate_samples, preview, reconstruction_panes, summarize
from interiorfusion_vae.latents import check_data_resolutions, encode_dataset
from interiorfusion_vae.model import SLATInteriorVAE
from interiorfusion_vae.task import VAETask, build_vae, mean_material


class VAEStage(Stage):
    config_model = VAEPretrainConfig  # name, kind and inputs: VAEPretrainConfig.stage

    def run(self, ctx: StageContext) -> StageResult:
        config: VAEPretrainConfig = ctx.config
        # ZeRO-3 works: the sparse layers that own weights show DeepSpeed's hooks plain tensors
        # (interiorfusion_core.sparse.nn.SparseModule), so their weights are re-gathered for backward.
        data_uri = ctx.inputs["data"].uri
        if config.encode.enabled:
            check_data_resolutions(data_uri, config)  # a resolution the data lacks fails now, not after training
        trainer = Trainer(ctx, VAETask(config, data_uri))
        result = trainer.fit()
        metrics = dict(result.metrics)
        outputs = {"checkpoint": result.checkpoint}
        rt = trainer.rt  # accelerate's rank, world size and device: the ones training ran on
        model = load_trained(ctx, result.checkpoint, config, rt.device)
        resolution = final_resolution(config)
        report = held_out_report(model, data_uri, config, resolution, rt)
        if report is not None:
            ctx.output.put_json("eval.json", report)
            metrics |= {f"heldout_{k}": v for k, v in report["metrics"].items()}
            ctx.tracker.log_metrics({f"heldout/{k}": v for k, v in report["metrics"].items()}, step=result.step)
            if report["samples"]:
                ctx.tracker.log_image(preview(model, data_uri, config, resolution, rt.device),
                                      "vae_reconstruction.png")
                viewer = publish_scenes(ctx, "reconstruction",
                                        reconstruction_panes(model, data_uri, config, resolution, rt.device),
                                        title=f"vae · held-out {config.encode.eval_split}: input | free decode")
                if viewer:
                    outputs["viewer"] = viewer
        if config.encode.enabled:
            encoded = encode_dataset(ctx.output, model, data_uri, config, work_dir=ctx.work_dir, rt=rt,
                                     device=rt.device)
            outputs["latents"] = encoded.index
            metrics |= encoded.metrics
            if rt.is_main:
                ctx.tracker.log_metrics({f"encode/{k}": v for k, v in encoded.metrics.items()}, step=result.step)
        return StageResult(metrics=metrics, outputs=outputs)


def held_out_report(model: SLATInteriorVAE, data_uri: str, config: VAEPretrainConfig, resolution: int,
                    rt: Runtime) -> dict[str, Any] | None:
    """Held-out reconstruction, sharded: rank r scores samples r, r + W, ...; rank 0 gets the eval.json report
    (None on the other ranks). A collective: every rank calls it."""
    held = open_dataset(data_uri, config.encode.eval_split)
    indices = list(range(min(len(held), config.encode.eval_samples)))
    # One rank reads the training samples for the baselines (mean material, majority class); the others get them.
    prior, majority = broadcast_object(
        (mean_material(data_uri, resolution).tolist(), class_prior(data_uri, resolution)) if rt.is_main else None, rt)
    records = evaluate_samples(model, data_uri, config, resolution, indices[rt.rank::rt.world_size],
                               torch.tensor(prior, dtype=torch.float32), rt.device, majority_class=majority)
    everyone = gather_objects(records, rt)
    return summarize([r for rank in everyone for r in rank], config, resolution) if rt.is_main else None


def final_resolution(config: VAEPretrainConfig) -> int:
    """The resolution the latents describe (model.target_resolution: the curriculum ends there)."""
    return config.model.target_resolution


def load_trained(ctx: StageContext, checkpoint: str, config: VAEPretrainConfig,
                 device: torch.device | str = "cpu") -> SLATInteriorVAE:
    """The trained weights (the Trainer's single-file model.safetensors) in eval mode on `device`."""
    from safetensors.torch import load_file

    # Each rank downloads into its own work dir: open_local's cache is shared by every process on a node and keyed
    # by URI, so ranks would race on one file and a --force rerun could find the previous run's weights there.
    path = ctx.output.get_file(f"{checkpoint}/model.safetensors", Path(ctx.work_dir) / "model.safetensors")
    model = build_vae(config)
    model.load_state_dict(load_file(str(path)))
    path.unlink(missing_ok=True)
    return model.to(device).eval()


def load_vae_output(source: Any, device: torch.device | str = "cpu", work_dir: Path | None = None
                    ) -> SLATInteriorVAE:
    """The trained VAE of a completed VAE stage output (its URI, store or the StageInput a downstream stage got),
    with the config it was trained with, in eval mode on `device`: what the DiT stages decode through."""
    import tempfile

    from safetensors.torch import load_file

    from interiorfusion_core.errors import UserError
    from interiorfusion_core.manifest import read_manifest
    from interiorfusion_core.storage import ArtifactStore, open_store

    uri = getattr(source, "uri", source)
    store = source if isinstance(source, ArtifactStore) else open_store(str(uri))
    manifest = read_manifest(store)
    if manifest.stage != "vae" or "checkpoint" not in manifest.outputs:
        raise UserError(f"{store.uri}: is an output of stage '{manifest.stage}', not a trained VAE")
    config = VAEPretrainConfig.model_validate(manifest.config)
    with tempfile.TemporaryDirectory(prefix="interiorfusion-vae-", dir=work_dir) as tmp:
        path = store.get_file(f"{manifest.outputs['checkpoint']}/model.safetensors", Path(tmp) / "vae.safetensors")
        model = build_vae(config)
        model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()
