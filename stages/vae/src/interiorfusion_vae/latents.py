"""The VAE's latents on disk: the encode job's shard writer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from interiorfusion_core.contract import StageContext
from interiorfusion_data.loader import open_dataset
from interiorfusion_vae.config import VAEPretrainConfig
from interiorfusion_vae.evaluate import scene_batch
from interiorfusion_vae.model import SLATInteriorVAE
from interiorfusion_vae.task import sparse_batch

LATENT_FORMAT = "interiorfusion.latents/1"


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
            occ, material = sparse_batch(scene_batch(sample))
            mu = model.encode(occ, material)["mu"]
            writer.add(sample["key"], mu.coords[:, 1:], mu.feats)
        writer.flush()
        index["splits"][split] = {"samples": len(dataset), "shards": writer.shards}
    ctx.output.put_json("latents/index.json", index)
    return "latents/index.json"
