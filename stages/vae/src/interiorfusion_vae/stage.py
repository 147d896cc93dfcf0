"""Stage 1: train the SLAT-Interior VAE, measure held-out reconstruction, then encode the whole dataset.

Outputs (under the stage's output prefix):
    checkpoints/step-XXXXXXXX/   the engine's checkpoints; the last holds a single-file model.safetensors
    latents/<split>/shard-NNNNNN.safetensors + .json   geometry and material latents (μ) with coordinates
    latents/index.json           splits, shards, latent layout
    eval.json                    held-out occupancy IoU and material L1, with the trivial baselines
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from interiorfusion_core.contract import Stage, StageContext, StageResult
from interiorfusion_core.engine import Trainer
from interiorfusion_core.errors import UserError
from interiorfusion_core.sparse import SparseTensor
from interiorfusion_data.loader import collate_scenes, open_dataset
from interiorfusion_vae.config import VAEPretrainConfig
from interiorfusion_vae.model import SLATInteriorVAE, lookup_rows
from interiorfusion_vae.render import soft_render
from interiorfusion_vae.task import VAETask, build_vae, mean_material, sparse_batch

LATENT_FORMAT = "interiorfusion.latents/1"


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
            report = evaluate(model, data_uri, config, resolution)
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


def _scene(sample: dict[str, Any]) -> dict[str, Any]:
    return collate_scenes([sample])


@torch.no_grad()
def reconstruct(model: SLATInteriorVAE, batch: dict[str, Any]) -> tuple[SparseTensor, torch.Tensor, torch.Tensor,
                                                                       SparseTensor]:
    """Encode, then decode freely (pruning by the heads' own logits): → (pred voxels, material, logits, truth)."""
    occ, material = sparse_batch(batch)
    enc = model.encode(occ, material)
    out = model.decode(enc["mu"])
    keep = out.occupancy_logits > 0
    pred = SparseTensor(out.voxels.coords[keep], out.material[keep], occ.spatial_shape, batch_size=occ.batch_size)
    return pred, out.material[keep], out.occupancy_logits, occ


@torch.no_grad()
def evaluate(model: SLATInteriorVAE, data_uri: str, config: VAEPretrainConfig, resolution: int) -> dict[str, Any]:
    """Held-out occupancy IoU and material L1 (albedo, metallic, roughness) of a free decode, beside two trivial
    baselines: filling every fine voxel of the occupied latent cells (what the latent coordinates alone give), and
    predicting the training set's mean material everywhere. Normals are reported as 1 − cos on shared voxels."""
    prior = mean_material(data_uri, resolution)
    held = open_dataset(data_uri, config.encode.eval_split)
    ious, base_ious, l1s, base_l1s, normal_errs = [], [], [], [], []
    for i in range(min(len(held), config.encode.eval_samples)):
        batch = _scene(held.get(i, resolution, fields=("voxels",)))
        pred, pred_mat, _, truth = reconstruct(model, batch)
        rows = lookup_rows(pred.coords, truth.coords)
        inter = int((rows >= 0).sum())
        union = len(pred) + len(truth) - inter
        ious.append(inter / max(union, 1))
        coarse = torch.unique(truth.coords[:, 1:] // config.model.compression, dim=0)
        base_ious.append(len(truth) / (len(coarse) * config.model.compression**3))
        true_mat = batch["feats"]
        if inter:
            hit, match = pred_mat[rows >= 0], true_mat[rows[rows >= 0]]
            l1s.append(float((hit[:, :5] - match[:, :5]).abs().mean()))
            cos = torch.nn.functional.cosine_similarity(hit[:, 5:8], match[:, 5:8], dim=1)
            normal_errs.append(float((1 - cos).mean()))
        base_l1s.append(float((prior[None, :5] - true_mat[:, :5]).abs().mean()))
    metrics = {
        "occupancy_iou": float(np.mean(ious)) if ious else 0.0,
        "baseline_occupancy_iou": float(np.mean(base_ious)) if base_ious else 0.0,
        "material_l1": float(np.mean(l1s)) if l1s else 1.0,
        "baseline_material_l1": float(np.mean(base_l1s)) if base_l1s else 1.0,
        "normal_cosine_error": float(np.mean(normal_errs)) if normal_errs else 1.0,
    }
    return {"split": config.encode.eval_split, "resolution": resolution, "samples": len(ious), "metrics": metrics}


def _colorize(depth: np.ndarray, lo: float, hi: float) -> np.ndarray:
    from matplotlib import colormaps

    norm = np.clip((depth - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = (colormaps["viridis"](norm)[..., :3] * 255).astype(np.uint8)
    rgb[depth <= 0] = 0
    return rgb


@torch.no_grad()
def preview(model: SLATInteriorVAE, data_uri: str, config: VAEPretrainConfig, resolution: int) -> bytes:
    """True depth | depth of the decoded surface, for the first views of a held-out scene (PNG bytes)."""
    from PIL import Image

    held = open_dataset(data_uri, config.encode.eval_split)
    sample = held.get(0, resolution, fields=("voxels", "views"))
    batch = _scene(sample)
    pred, _, _, _ = reconstruct(model, batch)
    from interiorfusion_vae.losses import voxel_centres

    centres = voxel_centres(pred.coords, batch["origin"].float(), batch["voxel_size"].float())
    rows = []
    for v in range(min(batch["depth"].shape[1], 2)):
        true = batch["depth"][0, v].numpy()
        h, w = true.shape
        r = soft_render(centres, torch.ones(len(centres)), batch["intrinsics"][0, v], batch["cam_to_world"][0, v],
                        h, w, float(batch["voxel_size"][0]))
        lo, hi = float(true[true > 0].min(initial=0)), float(true.max())
        rows.append(np.concatenate([_colorize(true, lo, hi), _colorize(r.depth.numpy(), lo, hi)], axis=1))
    img = Image.fromarray(np.concatenate(rows, axis=0)).resize((rows[0].shape[1] * 4, len(rows) * rows[0].shape[0] * 4),
                                                               Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class LatentShardWriter:
    """Buffers per-sample latents of one split and writes them as safetensors shards (+ a JSON key list)."""

    def __init__(self, ctx: StageContext, split: str, samples_per_shard: int):
        self.ctx, self.split, self.limit = ctx, split, samples_per_shard
        self.shards: list[dict[str, Any]] = []
        self.keys: list[str] = []
        self.coords: list[torch.Tensor] = []
        self.feats: list[torch.Tensor] = []

    def add(self, key: str, coords: torch.Tensor, mu: torch.Tensor) -> None:
        self.keys.append(key)
        self.coords.append(coords)
        self.feats.append(mu)
        if len(self.keys) >= self.limit:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.keys:
            return
        name = f"latents/{self.split}/shard-{len(self.shards):06d}"
        counts = torch.tensor([len(c) for c in self.coords], dtype=torch.int64)
        tmp = Path(self.ctx.work_dir) / "latents.safetensors"
        save_file({"coords": torch.cat(self.coords).int(), "mu": torch.cat(self.feats).float(), "counts": counts},
                  str(tmp))
        self.ctx.output.put_file(f"{name}.safetensors", tmp)
        self.ctx.output.put_bytes(f"{name}.json", json.dumps({"keys": self.keys}).encode())
        self.shards.append({"shard": f"{name}.safetensors", "keys": f"{name}.json", "samples": len(self.keys)})
        self.keys, self.coords, self.feats = [], [], []


@torch.no_grad()
def encode_dataset(ctx: StageContext, model: SLATInteriorVAE, data_uri: str, config: VAEPretrainConfig,
                   resolution: int) -> str:
    """Geometry and material latents (μ) of every sample of every split, in safetensors shards:
    `coords` [ΣM, 3] int32 latent-grid coordinates, `mu` [ΣM, 2·latent_dim] (geometry | material channels),
    `counts` [samples] rows per sample, in the order of the shard's JSON key list."""
    dim = config.model.latent_dim
    index: dict[str, Any] = {"format": LATENT_FORMAT, "resolution": resolution,
                             "latent_resolution": resolution // config.model.compression, "latent_dim": dim,
                             "channels": {"geometry": [0, dim], "material": [dim, 2 * dim]}, "splits": {}}
    for split in config.encode.splits:
        dataset = open_dataset(data_uri, split)
        writer = LatentShardWriter(ctx, split, config.encode.samples_per_shard)
        for i in range(len(dataset)):
            sample = dataset.get(i, resolution, fields=("voxels",))
            occ, material = sparse_batch(_scene(sample))
            mu = model.encode(occ, material)["mu"]
            writer.add(sample["key"], mu.coords[:, 1:], mu.feats)
        writer.flush()
        index["splits"][split] = {"samples": len(dataset), "shards": writer.shards}
    ctx.output.put_json("latents/index.json", index)
    return "latents/index.json"
