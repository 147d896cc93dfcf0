"""Stage 2 as a training-engine task: latents joined with their condition views, both flows' losses, depth guidance.

A batch holds up to `training.batch_size` samples (and at most `max_tokens` latent cells) of one curriculum
resolution: the VAE's normalised geometry latents on their cells, plus one condition view per sample (a random view
each epoch in training, view 0 in validation) with its depth, camera, the voxel frame and the layout text.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from interiorfusion_core.config.base import CurriculumPhase
from interiorfusion_core.engine import TrainTask
from interiorfusion_core.engine.step import StepContext
from interiorfusion_core.engine.task import move_batch
from interiorfusion_core.errors import UserError
from interiorfusion_data.format import SampleError
from interiorfusion_data.loader import SceneDataset, collate_scenes
from interiorfusion_structure.attention import Segments
from interiorfusion_structure.conditions import build_frozen_encoders, frozen_features
from interiorfusion_structure.config import DiTStructureConfig
from interiorfusion_structure.feature_cache import open_feature_caches
from interiorfusion_structure.flow import interpolate, one_step_estimate, sample_timesteps
from interiorfusion_structure.lifting import cell_values, lift_depth, patch_values
from interiorfusion_structure.model import FlowInput, StructureModel, occupancy_grid, patchify
from interiorfusion_vae.latents import LatentDataset, decode_geometry, open_latents
from interiorfusion_vae.render import soft_render

log = logging.getLogger("interiorfusion_structure")
VIEW_FIELDS = ("views", "layout")
# Where the frozen encoders' features are cached: beside the data's shards (not one of its manifest's artifacts).
FEATURE_CACHE_PREFIX = "feature_cache"
# Batch fields that are network inputs (cast to the training dtype); geometry and targets stay float32.
FEATURE_FIELDS = frozenset({"feats", "rgb"})


# ------------------------------------------------------------------------------------------------- data
class StructureData:
    """One split at one resolution: latents (normalised) and the data split holding their condition views."""

    def __init__(self, latents_source: Any, split: str, resolution: int, data_uri: str | None = None):
        self.latents: LatentDataset = open_latents(latents_source, split, resolution)
        self.data: SceneDataset = self.latents.open_data(data_uri)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.latents)

    def sample(self, i: int, view_seed: tuple[int, ...] | None = None) -> dict[str, Any]:
        """Latent sample i and one condition view: drawn from `view_seed` (training), else view 0."""
        lat = self.latents[i]
        views: list[int] | int = 1 if view_seed is not None else [0]
        cond = self.data.get(int(lat["index"]), None, fields=VIEW_FIELDS, views=views, view_seed=view_seed)
        return {"latent": lat, "cond": cond}

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return self.collate_with_views(samples)[0]

    def collate_with_views(self, samples: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the batch, the collated condition samples: every view and field they were read with)."""
        lat = [s["latent"] for s in samples]
        views = collate_scenes([s["cond"] for s in samples])
        coords = torch.cat([torch.cat([torch.full((len(s["coords"]), 1), b, dtype=torch.int32),
                                       torch.as_tensor(s["coords"], dtype=torch.int32)], 1) for b, s in enumerate(lat)])
        feats = torch.cat([torch.as_tensor(s["geometry"], dtype=torch.float32) for s in lat])
        frames = [s["frame"] for s in lat]
        return {
            "keys": [s["key"] for s in lat],
            "index": torch.tensor([int(s["index"]) for s in lat]),
            "coords": coords, "feats": feats, "normalized": True,
            "num_tokens": torch.tensor([len(s["coords"]) for s in lat], dtype=torch.int64),
            "resolution": self.resolution, "latent_resolution": self.latents.latent_resolution,
            "compression": self.resolution // self.latents.latent_resolution,
            "origin": torch.tensor(np.stack([np.asarray(s["origin"], np.float64) for s in lat]), dtype=torch.float32),
            "cube_size": torch.tensor([float(f.cube_size) for f in frames], dtype=torch.float32),
            "voxel_size": torch.tensor([float(f.cube_size) / self.resolution for f in frames], dtype=torch.float32),
            "rgb": views["rgb"][:, 0], "depth": views["depth"][:, 0],
            "intrinsics": views["intrinsics"][:, 0], "cam_to_world": views["cam_to_world"][:, 0],
            "layout_text": views.get("layout_text", [""] * len(lat)),
            "has_layout": views.get("has_layout", torch.ones(len(lat), dtype=torch.bool)),
        }, views


class StructureLoader:
    """Resumable token-budget batches of `StructureData` (the engine's ResumableLoader contract): the position is
    (epoch, batches handed out); views are drawn per (seed, epoch, sample) so a resumed run sees the same ones."""

    def __init__(self, data: StructureData, batch_size: int, max_tokens: int, *, shuffle: bool, seed: int,
                 rank: int, world_size: int, random_views: bool, max_corrupt_fraction: float = 0.01):
        self.data, self.seed, self.random_views = data, seed, random_views
        self.sampler = data.latents.batch_sampler(max_tokens, shuffle=shuffle, seed=seed, rank=rank,
                                                  world_size=world_size, max_samples=batch_size)
        self.epoch, self.consumed = 0, 0
        self.max_corrupt_fraction = max_corrupt_fraction
        self.corrupt = 0

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.sampler.set_epoch(self.epoch)
        batches = list(self.sampler)
        for indices in batches[self.consumed:]:
            samples = []
            for i in indices:
                try:
                    samples.append(self.data.sample(
                        i, (self.seed, self.epoch, i) if self.random_views else None))
                except SampleError as exc:
                    self.corrupt += 1
                    log.warning("skipping a corrupt sample: %s", exc)
                    if self.corrupt > self.max_corrupt_fraction * max(len(self.data), 1):
                        raise UserError(f"{self.data.latents.uri}: {self.corrupt} corrupt samples, more than "
                                        f"data.max_corrupt_fraction {self.max_corrupt_fraction}; first: {exc}"
                                        ) from None
            self.consumed += 1
            if samples:
                yield self.data.collate(samples)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = int(epoch), 0
        elif self.consumed >= len(self):
            self.consumed = 0


class SampleNoise:
    """Noise and timesteps drawn per sample from (seed, step, the sample's data index, stream): a sample gets the
    same draws whichever rank or micro-batch it lands in, so 2 ranks reproduce 1 process accumulating 2 micro-batches
    (and a resumed run the same draws). Validation uses step −1: the same noise at every validation; `draw` > 0
    gives further fixed draws of it (held-out reports average several)."""

    def __init__(self, seed: int, step: int, indices: torch.Tensor, draw: int = 0):
        self.seed, self.step, self.indices = seed, step, [int(i) for i in indices.tolist()]
        self.draw = draw

    def _gen(self, i: int, stream: str) -> torch.Generator:
        entropy = [self.seed, self.step + 1, i, sum(map(ord, stream)) * 7919 + len(stream)]
        key = np.random.SeedSequence(entropy + ([self.draw] if self.draw else []))
        return torch.Generator().manual_seed(int(key.generate_state(1, np.uint64)[0] >> 1))

    def normal(self, counts: torch.Tensor, channels: int, stream: str) -> torch.Tensor:
        return torch.cat([torch.randn(int(n), channels, generator=self._gen(i, stream))
                          for i, n in zip(self.indices, counts.tolist(), strict=True)])

    def uniform(self, stream: str) -> torch.Tensor:
        """One U(0, 1) draw per sample [B] (e.g. whether to drop a condition)."""
        return torch.cat([torch.rand(1, generator=self._gen(i, stream)) for i in self.indices])

    def timesteps(self, law: str, p_mean: float, p_std: float, t_range: tuple[float, float], stream: str
                  ) -> torch.Tensor:
        return torch.cat([sample_timesteps(1, law, p_mean, p_std, t_range, self._gen(i, stream))
                          for i in self.indices])


# ------------------------------------------------------------------------------------------------- task
class StructureTask(TrainTask):
    unit_name = "tokens"

    def __init__(self, config: DiTStructureConfig, latents: Any, vae: nn.Module | None = None,
                 data_uri: str | None = None):
        self.config = config
        self.latents_source = latents
        self.data_uri = data_uri  # the conditions' data (default: the one the latents' manifest names)
        self.vae = vae  # the frozen VAE (depth guidance decodes x̂1 with its geometry decoder)
        self.resolution = self.first_resolution()
        probe = open_latents(latents, "train", self.resolution)
        self.latent_channels = probe.stats.latent_dim
        self.feature_cache: Any = None
        self.step = 0
        # Which fixed noise draw an eval-mode loss uses (SampleNoise.draw); held-out reports average a few.
        self.eval_draw = 0

    def first_resolution(self) -> int:
        curriculum = self.config.training.curriculum
        return curriculum[0].resolution if curriculum else self.target_resolution()

    def target_resolution(self) -> int:
        """The curriculum's last resolution, or (no curriculum) the VAE's target resolution."""
        curriculum = self.config.training.curriculum
        if curriculum:
            return curriculum[-1].resolution
        return int(open_latents(self.latents_source, "train").info["target_resolution"])

    def build_model(self, config: Any) -> nn.Module:
        return StructureModel(config, self.latent_channels)

    def frozen_models(self, config: Any) -> Mapping[str, nn.Module]:
        frozen = dict(build_frozen_encoders(config.model.conditioning))
        if self.vae is not None and config.loss.depth_guidance.weight > 0:
            frozen["vae"] = self.vae
        return frozen

    def open_split(self, split: str, resolution: int) -> StructureData:
        """One split's samples at one resolution (the material task's carry more fields)."""
        return StructureData(self.latents_source, split, resolution, self.data_uri)

    def _loader(self, split: str, resolution: int, rank: int, world_size: int, seed: int,
                shuffle: bool) -> StructureLoader:
        data = self.open_split(split, resolution)
        return StructureLoader(data, self.config.training.batch_size, self.config.max_tokens, shuffle=shuffle,
                               seed=seed, rank=rank, world_size=world_size, random_views=shuffle,
                               max_corrupt_fraction=self.config.data.max_corrupt_fraction)

    def make_loader(self, phase: CurriculumPhase | None, rank: int, world_size: int, seed: int) -> StructureLoader:
        resolution = phase.resolution if phase is not None else self.target_resolution()
        return self._loader("train", resolution, rank, world_size, seed, shuffle=True)

    def on_phase(self, phase: CurriculumPhase | None, model: nn.Module) -> None:
        self.resolution = phase.resolution if phase is not None else self.target_resolution()

    def val_batches(self, rank: int, world_size: int) -> StructureLoader | None:
        split = self.config.eval.splits[0]
        try:
            data = self.open_split(split, self.resolution)
        except UserError:
            return None
        if len(data) == 0:
            return None
        return StructureLoader(data, self.config.training.batch_size, self.config.max_tokens, shuffle=False,
                               seed=0, rank=rank, world_size=world_size, random_views=False)

    def train_step(self, step: StepContext) -> Mapping[str, torch.Tensor]:
        self.step = step.step
        return super().train_step(step)

    def encoders(self) -> dict[str, nn.Module]:
        """The frozen condition encoders (the frozen models but the VAE)."""
        return {k: v for k, v in self.frozen.items() if k != "vae"}

    def conditions(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The batch plus the frozen encoders' features, from the cache beside the data where it has them."""
        encoders = self.encoders()
        if self.feature_cache is None and encoders and self.config.model.conditioning.feature_cache:
            data = open_latents(self.latents_source, "train", self.resolution).open_data()
            self.feature_cache = open_feature_caches(data.store.child(FEATURE_CACHE_PREFIX), encoders)
        return {**batch, **frozen_features(encoders, batch, self.feature_cache)}

    def compute_losses(self, model: nn.Module, batch: Any) -> Mapping[str, torch.Tensor]:
        cfg = self.config
        fm = cfg.flow_matching
        B = len(batch["num_tokens"])
        device = batch["feats"].device
        segments = Segments.from_lengths(batch["num_tokens"].cpu()).to(device)
        token_sample = segments.ids()

        noise = SampleNoise(self.config.training.seed, self.step if model.training else -1, batch["index"],
                            0 if model.training else self.eval_draw)
        # Latent flow: the seed's loss on the sample's own cells.
        x1 = batch["feats"]
        x0 = noise.normal(batch["num_tokens"], x1.shape[1], "latent").to(device, x1.dtype)
        t = noise.timesteps(fm.timestep, fm.p_mean, fm.p_std, fm.t_range, "t_latent").to(device)
        x_t = interpolate(x0, x1, t[token_sample])
        R = int(batch["latent_resolution"])
        lifted = None
        if cfg.model.lift_depth:
            keep = torch.ones(B, dtype=torch.bool)
            if model.training:  # dropped with the depth modality's probability (deterministic per sample)
                keep = noise.uniform("lift") >= cfg.model.conditioning.dropout.depth
            lifted = lifted_depth(batch, R, keep.to(device))
        latent_in = FlowInput(x_t, batch["coords"], segments, t,
                              None if lifted is None else cell_values(lifted, batch["coords"]))

        # Occupancy flow: the dense latent grid, ±1 per cell, `patch`³ cells per token.
        grid = occupancy_grid(batch["coords"], B, R) * 2 - 1
        o1, o_coords = patchify(grid.to(x1.dtype), min(cfg.occupancy.patch, R))
        per_sample = len(o1) // B
        o0 = noise.normal(torch.full((B,), per_sample), o1.shape[1], "occupancy").to(device, x1.dtype)
        to = noise.timesteps(fm.timestep, fm.p_mean, fm.p_std, fm.t_range, "t_occupancy").to(device)
        o_segments = Segments.from_lengths([per_sample] * B).to(device)
        o_t = interpolate(o0, o1, to.repeat_interleave(per_sample))
        occ_in = FlowInput(o_t, o_coords, o_segments, to,
                           None if lifted is None else patch_values(lifted, min(cfg.occupancy.patch, R)))

        out = model(self.conditions(batch), latent_in, occ_in)
        v = out["latent"]
        losses: dict[str, torch.Tensor] = {
            "flow_matching": F.mse_loss(v.float(), (x1 - x0).float()),
            "occupancy": F.mse_loss(out["occupancy"].float(), (o1 - o0).float()),
        }
        total = cfg.loss.flow_matching.weight * losses["flow_matching"] + cfg.loss.occupancy.weight * losses[
            "occupancy"]
        dg = cfg.loss.depth_guidance
        if dg.weight > 0 and "vae" in self.frozen:
            x_hat = one_step_estimate(x_t, t[token_sample], v)
            depth_loss = self.depth_guidance(batch, x_hat, t)
            losses["depth_guidance"] = depth_loss
            total = total + dg.weight * depth_loss
        losses["loss"] = total
        return losses

    def depth_guidance(self, batch: Mapping[str, Any], x_hat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """L1 (metres) between the condition depth and the depth rendered from x̂1's decoded geometry, over the
        samples with t ≥ min_t and the pixels where the condition depth is valid. Gradients reach x̂1 through the
        frozen VAE decoder's occupancy and the soft z-buffer."""
        cfg = self.config.loss.depth_guidance
        keep = (t >= cfg.min_t).nonzero().flatten().tolist()
        zero = x_hat.sum() * 0.0  # keeps the graph (every rank back-propagates through the same parameters)
        if not keep:
            return zero.float()
        vae = self.frozen["vae"]
        stats = geometry_stats(self.latents_source, self.resolution)
        raw = x_hat.float() * stats[1].to(x_hat.device) + stats[0].to(x_hat.device)
        geo = decode_geometry(vae, {**batch, "feats": raw.to(next(vae.parameters()).dtype), "normalized": False})
        coords = geo.voxels.coords
        probs = torch.sigmoid(geo.occupancy_logits.float().reshape(-1))
        terms = []
        for b in keep:
            rows = coords[:, 0] == b
            if not bool(rows.any()):
                continue
            gt = batch["depth"][b].float()
            H, W = gt.shape
            K = batch["intrinsics"][b].float()
            scale = min(1.0, cfg.image_size / max(H, W))
            if scale < 1.0:
                h, w = max(1, round(H * scale)), max(1, round(W * scale))
                gt = F.interpolate(gt[None, None], size=(h, w), mode="nearest")[0, 0]
                K = K.clone()
                K[0] *= w / W
                K[1] *= h / H
                H, W = h, w
            vs = float(batch["voxel_size"][b])
            points = batch["origin"][b].float() + (coords[rows, 1:].float() + 0.5) * vs
            render = soft_render(points, probs[rows], K, batch["cam_to_world"][b].float(), H, W, vs)
            valid = gt > 0
            if bool(valid.any()):
                terms.append((render.depth - gt).abs()[valid].mean())
        return torch.stack(terms).mean() + zero if terms else zero.float()

    def count_units(self, batch: Any) -> int:
        return int(batch["coords"].shape[0])

    def batch_size_of(self, batch: Any) -> int:
        return len(batch["num_tokens"])

    def to_device(self, batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
        return batch_to_device(batch, device, dtype)


def lifted_depth(batch: Mapping[str, Any], grid: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The batch's condition depth lifted into the R³ latent grid ([B, R, R, R, 2]); samples with keep false get
    zeros (depth unknown)."""
    lifted = lift_depth(batch["depth"].float(), batch["intrinsics"].float(), batch["cam_to_world"].float(),
                        batch["origin"].float(), batch["cube_size"].float(), grid)
    if keep is not None:
        lifted = lifted * keep.to(lifted.dtype)[:, None, None, None, None]
    return lifted


def batch_to_device(batch: Mapping[str, Any], device: torch.device | str, dtype: torch.dtype | None = None
                    ) -> dict[str, Any]:
    """Latent features and images take the training dtype; cameras, frames and depth targets stay float32."""
    return move_batch(batch, device, dtype, FEATURE_FIELDS)


_STATS: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}


def geometry_stats(source: Any, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the geometry channels at `resolution` (float32), read once per process."""
    key = (str(getattr(source, "uri", source)), resolution)
    if key not in _STATS:
        ds = open_latents(source, "train", resolution)
        span = ds.stats.channels("geometry")
        _STATS[key] = (ds.stats.mean[span].float(), ds.stats.std[span].float())
    return _STATS[key]


__all__ = ["SampleNoise", "StructureData", "StructureLoader", "StructureTask", "batch_to_device", "geometry_stats"]
