"""The VAE as a training-engine task: model, data per curriculum phase, losses."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from interiorfusion_core.config.base import CurriculumPhase
from interiorfusion_core.engine import TrainTask, register_model_builder
from interiorfusion_core.engine.distributed import unwrap
from interiorfusion_core.engine.step import StepContext
from interiorfusion_core.engine.task import move_batch
from interiorfusion_core.sparse import SparseTensor
from interiorfusion_data.loader import SceneLoader, open_dataset
from interiorfusion_data.scene import CLASSES
from interiorfusion_vae.config import VAEPretrainConfig
from interiorfusion_vae.losses import vae_losses
from interiorfusion_vae.model import SLATInteriorVAE, lookup_rows

FIELDS = ("voxels", "views")
# Batch fields the network consumes as features; `to_device` casts only these to the training dtype.
FEATURE_FIELDS = frozenset({"feats"})


def build_vae(config: VAEPretrainConfig) -> SLATInteriorVAE:
    m = config.model
    backend = None if m.sparse_backend == "auto" else m.sparse_backend
    return SLATInteriorVAE(m.latent_dim, list(m.channels), m.blocks_per_level, backend, num_classes=len(CLASSES),
                           material_geometry_dropout=m.material_geometry_dropout)


# Surface voxels of an interior at resolution N grow like its area: ≈ 4·N² (measured on the procedural rooms:
# 4.2k at 32³, 16k at 64³, ~270k at 256³).
SURFACE_VOXELS_PER_N2 = 4.0


def surface_voxels(resolution: int) -> float:
    return SURFACE_VOXELS_PER_N2 * resolution**2


def vae_flops_per_sample(config: VAEPretrainConfig, phase: CurriculumPhase | None) -> float:
    """Training FLOPs (forward + backward ≈ 3 × forward) of the submanifold convs, which dominate: at level l
    a 3³ conv does 2·27·C_l² multiply-adds per voxel, on ≈ 4·(N/2^l)² voxels; two encoders and one decoder."""
    n = phase.resolution if phase is not None else config.model.target_resolution
    m = config.model
    fwd = sum(3 * m.blocks_per_level * 2 * 2 * 27 * c * c * surface_voxels(n // 2**level)
              for level, c in enumerate(m.channels))
    return 3.0 * fwd


def vae_activation_bytes(config: VAEPretrainConfig, phase: CurriculumPhase | None, micro_batch: int,
                         checkpointing: bool) -> float:
    """Saved activations: ~6 tensors of C_l floats per voxel per block (norm, act, conv in and out) in bf16."""
    n = phase.resolution if phase is not None else config.model.target_resolution
    m = config.model
    per_sample = sum(3 * m.blocks_per_level * 6 * c * 2 * surface_voxels(n // 2**level)
                     for level, c in enumerate(m.channels))
    return micro_batch * per_sample * (0.25 if checkpointing else 1.0)


VAE_MODEL = register_model_builder(
    "vae_pretrain", build_vae, flops_per_sample=vae_flops_per_sample, activation_bytes=vae_activation_bytes,
    tokens_per_sample=lambda config, phase: surface_voxels(
        phase.resolution if phase is not None else config.model.target_resolution),
    description="SLAT-Interior sparse VAE (two sparse-conv encoders, pruning decoder)",
)


def sparse_batch(batch: Mapping[str, Any], dtype: torch.dtype | None = None) -> tuple[SparseTensor, torch.Tensor]:
    """The collated scene batch as a sparse occupancy tensor at its resolution and its [N, 8] materials."""
    coords = batch["coords"].long()
    feats = batch["feats"]
    if dtype is not None:
        feats = feats.to(dtype)
    res = int(batch["resolution"])
    occ = SparseTensor(coords, feats.new_ones(len(coords), 1), res, batch_size=len(batch["num_voxels"]))
    return occ, feats


def mean_material(data_uri: str, resolution: int, samples: int = 16) -> torch.Tensor:
    """Mean per-voxel material over the first training samples (the prior the material head starts from)."""
    dataset = open_dataset(data_uri, "train")
    feats = [torch.from_numpy(dataset.get(i, resolution, fields=("voxels",))["feats"]).float()
             for i in range(min(len(dataset), samples))]
    return torch.cat(feats).mean(0) if feats else torch.full((8,), 0.5)


class VAETask(TrainTask):
    unit_name = "voxels"

    def __init__(self, config: VAEPretrainConfig, data_uri: str):
        self.config = config
        self.data_uri = data_uri
        self.resolution = config.first_resolution
        self.step = 0

    def build_model(self, config: Any) -> nn.Module:
        model = build_vae(config)
        model.set_material_prior(mean_material(self.data_uri, config.first_resolution))
        return model

    def _loader(self, split: str, resolution: int, rank: int, world_size: int, seed: int,
                shuffle: bool = True) -> SceneLoader:
        views = self.config.loss.render_views
        return SceneLoader(
            open_dataset(self.data_uri, split), self.config.training.batch_size, resolution=resolution,
            fields=FIELDS if views else ("voxels",), views=views or None, random_views=shuffle, shuffle=shuffle,
            seed=seed, rank=rank, world_size=world_size, num_workers=self.config.data.num_workers,
            pin_memory=self.config.data.pin_memory, max_corrupt_fraction=self.config.data.max_corrupt_fraction,
            read_ahead=self.config.data.read_ahead,
        )

    def make_loader(self, phase: CurriculumPhase | None, rank: int, world_size: int, seed: int) -> SceneLoader:
        resolution = phase.resolution if phase is not None else self.config.model.target_resolution
        return self._loader("train", resolution, rank, world_size, seed)

    def on_phase(self, phase: CurriculumPhase | None, model: nn.Module) -> None:
        self.resolution = phase.resolution if phase is not None else self.config.model.target_resolution

    def val_batches(self, rank: int, world_size: int) -> Iterable[Any] | None:
        dataset = open_dataset(self.data_uri, self.config.encode.eval_split)
        if len(dataset) == 0:
            return None
        return self._loader(self.config.encode.eval_split, self.resolution, rank, world_size, seed=0, shuffle=False)

    def train_step(self, step: StepContext) -> Mapping[str, torch.Tensor]:
        self.step = step.step
        return super().train_step(step)

    def proposal_ratio(self) -> float:
        """Own false proposals per true child at the current step (the linear ramp of `loss.pruning_proposals`)."""
        cfg, total = self.config.loss, self.config.training.max_steps
        start = cfg.pruning_proposals_start * total
        if self.step <= start or cfg.pruning_proposals <= 0:
            return 0.0
        return cfg.pruning_proposals * min(1.0, (self.step - start) / max(total - start, 1))

    def compute_losses(self, model: nn.Module, batch: Any) -> Mapping[str, torch.Tensor]:
        occ, material = sparse_batch(batch)
        proposals = self.proposal_ratio() if model.training else 0.0
        enc, out = model(occ, material, proposals=proposals)
        losses = dict(self._losses(enc, out, occ, material, batch))
        if not model.training:
            # Validation also decodes freely (the heads' own pruning): teacher-forced losses cannot show the
            # errors that compound level by level when the decoder follows its own proposals.
            with torch.no_grad():
                free = unwrap(model).decode(enc["mu"])
                keep = free.occupancy_logits > 0
                hit = int((lookup_rows(free.voxels.coords[keep], occ.coords) >= 0).sum())
                union = int(keep.sum()) + len(occ) - hit
                losses["free_decode_iou"] = torch.tensor(hit / max(union, 1), device=out.occupancy_logits.device)
        return losses

    def _losses(self, enc: Any, out: Any, occ: SparseTensor, material: torch.Tensor,
                batch: Any) -> Mapping[str, torch.Tensor]:
        return vae_losses(enc, out, occ, material, batch, self.config.loss, self.config.loss.kl_reduction,
                          self.config.loss.render_views)

    def count_units(self, batch: Any) -> int:
        return int(batch["coords"].shape[0])

    def batch_size_of(self, batch: Any) -> int:
        return len(batch["num_voxels"])

    def to_device(self, batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
        """Only the model's input features take the training dtype (bf16 under DeepSpeed bf16); geometry and metric
        targets stay at least float32 (`move_batch`)."""
        return move_batch(batch, device, dtype, FEATURE_FIELDS)
