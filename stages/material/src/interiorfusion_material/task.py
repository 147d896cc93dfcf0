"""Stage 3 as a training-engine task: the rectified flow over material latents on the true geometry, plus the seed's
five losses on the decoded one-step estimate.

A batch is the structure stage's (latents + one condition view per sample) with, in addition: the material
latents (`feats`: the flow's data), the geometry latents (`geometry`: the per-token condition), the true voxels
and their materials at the batch's resolution (`voxel_coords`, `voxel_feats`), the first `render.views` stored
views (`render_*`, the condition view first) and the sample's stored lights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from interiorfusion_core.errors import UserError
from interiorfusion_core.sparse import SparseTensor, space_to_channel
from interiorfusion_material.config import DiTMaterialConfig
from interiorfusion_material.losses import image_terms, material_terms, view_pixels
from interiorfusion_material.model import MaterialModel, geometry_token_cond
from interiorfusion_material.perceptual import build_lpips
from interiorfusion_structure.attention import Segments
from interiorfusion_structure.conditions import build_frozen_encoders
from interiorfusion_structure.flow import interpolate, one_step_estimate
from interiorfusion_structure.lifting import cell_values
from interiorfusion_structure.model import FlowInput
from interiorfusion_structure.task import (
    SampleNoise,
    StructureData,
    StructureTask,
    lifted_depth,
)
from interiorfusion_vae.latents import open_latents
from interiorfusion_vae.model import lookup_rows

MATERIAL_FIELDS = ("voxels", "views", "layout")


# ------------------------------------------------------------------------------------------------- data
class MaterialData(StructureData):
    """One split at one resolution: latents (normalised), the condition and render views, the true voxels."""

    def __init__(self, latents_source: Any, split: str, resolution: int, views: int = 1,
                 data_uri: str | None = None):
        super().__init__(latents_source, split, resolution, data_uri)
        self.views = views

    def sample(self, i: int, view_seed: tuple[int, ...] | None = None) -> dict[str, Any]:
        lat = self.latents[i]
        if "material" not in lat:
            raise UserError(f"{self.latents.uri}: these latents have no material half (a geometry-only latent set); "
                            "stage 3 needs the VAE's full latents")
        cond = self.data.get(int(lat["index"]), self.resolution, fields=MATERIAL_FIELDS, views=self.views,
                             view_seed=view_seed)
        return {"latent": lat, "cond": cond}

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch, views = self.collate_with_views(samples)
        lat = [s["latent"] for s in samples]
        B = len(lat)
        batch.update({
            "feats": torch.cat([torch.as_tensor(s["material"], dtype=torch.float32) for s in lat]),
            "geometry": torch.cat([torch.as_tensor(s["geometry"], dtype=torch.float32) for s in lat]),
            "voxel_coords": views["coords"], "voxel_feats": views["feats"], "num_voxels": views["num_voxels"],
            "voxel_labels": views.get("labels", torch.zeros(len(views["coords"]), dtype=torch.int64)),
            "render_rgb": views["rgb"], "render_depth": views["depth"], "render_intrinsics": views["intrinsics"],
            "render_cam_to_world": views["cam_to_world"],
            "lights": views.get("lights", torch.zeros(B, 1, 4)),
            "num_lights": views.get("num_lights", torch.zeros(B, dtype=torch.int64)),
            "has_lights": views.get("has_lights", torch.zeros(B, dtype=torch.bool)),
            "has_materials": views.get("has_materials", torch.ones(B, dtype=torch.bool)),
        })
        return batch


def subdivision(voxel_coords: torch.Tensor, resolution: int, compression: int, batch_size: int
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The true voxels' subdivision, coarse → fine (each level's parent coords and which of their 8 children
    exist): what the VAE encoder hands its decoder, computed from the voxels alone (no encoder pass)."""
    ups = round(math.log2(compression))
    h = SparseTensor(voxel_coords.int(), voxel_coords.new_ones(len(voxel_coords), 1, dtype=torch.float32),
                     resolution, 1, batch_size=batch_size)
    levels, masks = [h], []
    for _ in range(ups):
        h, mask = space_to_channel(h.replace(h.feats[:, :1]))
        levels.append(h)
        masks.append(mask)
    return [(levels[i + 1].coords, masks[i]) for i in reversed(range(ups))]


def decode_materials(vae: nn.Module, coords: torch.Tensor, geometry_raw: torch.Tensor, material_raw: torch.Tensor,
                     batch_size: int, latent_resolution: int, compression: int,
                     structure: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> tuple[Any, torch.Tensor]:
    """(GeometryOutput, per-candidate materials [V, 8]) of raw (denormalised) latents on `coords` [T, 4]. The
    geometry branch runs without grad (it reads the geometry latent only, and the VAE is frozen); gradients reach
    `material_raw` through the material branch. `structure` teacher-forces the subdivision (true geometry)."""
    dtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device
    coords = coords.to(device).int()
    with torch.no_grad():
        z_geo = SparseTensor(coords, geometry_raw.to(device, dtype), latent_resolution, compression,
                             batch_size=batch_size)
        geo = vae.decoder.geometry(z_geo, structure)
    z = SparseTensor(coords, torch.cat([geometry_raw.to(device, dtype), material_raw.to(device, dtype)], 1),
                     latent_resolution, compression, batch_size=batch_size)
    return geo, vae.decoder.material(z, geo)


def true_rows(geo: Any, voxel_coords: torch.Tensor) -> torch.Tensor:
    """Rows of the true voxels among the decoded candidates (teacher-forced: every true voxel is one)."""
    rows = lookup_rows(voxel_coords.to(geo.voxels.coords.device).int(), geo.voxels.coords.int())
    if bool((rows < 0).any()):
        raise RuntimeError(f"{int((rows < 0).sum())} true voxels are not among the teacher-forced decode's "
                           "candidates: the latent cells and the voxels disagree")
    return rows


def material_flow_input(config: DiTMaterialConfig, batch: Mapping[str, Any], grid: int, coords: torch.Tensor,
                        num_tokens: torch.Tensor, x: torch.Tensor, t: torch.Tensor, level: torch.Tensor,
                        geometry: torch.Tensor, lift_keep: torch.Tensor | None = None) -> FlowInput:
    """The flow's tokens: x_t [T, L] on the geometry cells `coords` [T, 4], with the per-token geometry condition
    (normalised geometry latent, its noise level per sample `level` [B], the lifted condition depth: zeros for
    samples with lift_keep false)."""
    segments = Segments.from_lengths(num_tokens.cpu()).to(x.device)
    lifted = None
    if config.model.lift_depth:
        lifted = cell_values(lifted_depth(batch, grid, lift_keep), coords)
    cond = geometry_token_cond(geometry.to(x.dtype), level.to(x.device)[segments.ids()], lifted)
    return FlowInput(x, coords, segments, t, cond)


def decode_on_true_geometry(vae: nn.Module, batch: Mapping[str, Any],
                            stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]], material_latents: torch.Tensor
                            ) -> torch.Tensor:
    """[V, 8] materials decoded from normalised material latents [T, L] on the batch's true geometry (its geometry
    latents and subdivision), on its true voxels in the batch's voxel order (fp32)."""
    res, c = int(batch["resolution"]), int(batch["compression"])
    B = len(batch["num_tokens"])
    structure = subdivision(batch["voxel_coords"].to(material_latents.device), res, c, B)
    geo, mats = decode_materials(vae, batch["coords"], denormalize(batch["geometry"], stats["geometry"]),
                                 denormalize(material_latents, stats["material"]), B, int(batch["latent_resolution"]),
                                 c, structure)
    return mats[true_rows(geo, batch["voxel_coords"])].float()


_STATS: dict[tuple[str, int], dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}


def latent_stats(source: Any, resolution: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"geometry": (mean, std), "material": (mean, std)} of the latent channels at `resolution` (float32)."""
    key = (str(getattr(source, "uri", source)), resolution)
    if key not in _STATS:
        ds = open_latents(source, "train", resolution)
        out = {}
        for which in ("geometry", "material"):
            span = ds.stats.channels(which)
            out[which] = (ds.stats.mean[span].float(), ds.stats.std[span].float())
        _STATS[key] = out
    return _STATS[key]


def denormalize(x: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return x.float() * stats[1].to(x.device) + stats[0].to(x.device)


# ------------------------------------------------------------------------------------------------- task
class MaterialTask(StructureTask):
    """The structure task's data, curriculum, feature cache and per-sample noise; its own flow and losses."""

    def __init__(self, config: DiTMaterialConfig, latents: Any, vae: nn.Module):
        super().__init__(config, latents, vae)  # type: ignore[arg-type]
        self.config: DiTMaterialConfig = config  # type: ignore[assignment]

    def build_model(self, config: Any) -> nn.Module:
        return MaterialModel(config, self.latent_channels)

    def frozen_models(self, config: Any) -> Mapping[str, nn.Module]:
        frozen = dict(build_frozen_encoders(config.model.conditioning))
        frozen["vae"] = self.vae
        if config.loss.perceptual.weight > 0:
            frozen["lpips"] = build_lpips(config.lpips_weights, config.loss.perceptual.network)
        return frozen

    def encoders(self) -> dict[str, nn.Module]:
        return {k: v for k, v in self.frozen.items() if k not in ("vae", "lpips")}

    def open_split(self, split: str, resolution: int) -> MaterialData:
        return MaterialData(self.latents_source, split, resolution, self.config.render.views)

    def flow_input(self, batch: Mapping[str, Any], x: torch.Tensor, t: torch.Tensor, level: torch.Tensor,
                   geometry: torch.Tensor, lift_keep: torch.Tensor | None = None) -> FlowInput:
        return material_flow_input(self.config, batch, int(batch["latent_resolution"]), batch["coords"],
                                   batch["num_tokens"], x, t, level, geometry, lift_keep)

    def compute_losses(self, model: nn.Module, batch: Any) -> Mapping[str, torch.Tensor]:
        cfg = self.config
        fm = cfg.flow_matching
        B = len(batch["num_tokens"])
        device = batch["feats"].device
        noise = SampleNoise(cfg.training.seed, self.step if model.training else -1, batch["index"])
        segments = Segments.from_lengths(batch["num_tokens"].cpu()).to(device)
        token_sample = segments.ids()

        x1 = batch["feats"]
        x0 = noise.normal(batch["num_tokens"], x1.shape[1], "material").to(device, x1.dtype)
        t = noise.timesteps(fm.timestep, fm.p_mean, fm.p_std, fm.t_range, "t_material").to(device)
        x_t = interpolate(x0, x1, t[token_sample])
        # Geometry-noise augmentation (training): level ~ U(0, train_noise) per sample; validation: none.
        geometry = batch["geometry"].float()
        if model.training and cfg.geometry.train_noise > 0:
            level = noise.uniform("geometry_level").to(device) * cfg.geometry.train_noise
            eps = noise.normal(batch["num_tokens"], geometry.shape[1], "geometry").to(device)
            geometry = geometry + level[token_sample, None] * eps
        else:
            level = torch.zeros(B, device=device)
        keep = None
        if cfg.model.lift_depth and model.training:
            keep = (noise.uniform("lift") >= cfg.model.conditioning.dropout.depth).to(device)
        v = model(self.conditions(batch), self.flow_input(batch, x_t, t, level, geometry, keep))

        losses: dict[str, torch.Tensor] = {"flow_matching": F.mse_loss(v.float(), (x1 - x0).float())}
        total = cfg.loss.flow_matching.weight * losses["flow_matching"]
        # The seed's five terms on x̂1, decoded on the true geometry.
        x_hat = one_step_estimate(x_t, t[token_sample], v)
        materials, truth, has = self.decoded_on_truth(batch, x_hat)
        terms = material_terms(materials[has], truth[has], cfg.loss.albedo, cfg.loss.metallic_roughness)
        pixels = view_pixels(batch, cfg.render.views, cfg.render.image_size)
        terms |= image_terms(pixels, materials, cfg.loss.rendering,
                             self.frozen.get("lpips") if cfg.loss.perceptual.weight > 0 else None)
        for name, value in terms.items():
            losses[name] = value
            total = total + getattr(cfg.loss, name).weight * value
        losses["loss"] = total
        return losses

    def decoded_on_truth(self, batch: Mapping[str, Any], material_latents: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(materials decoded from normalised material latents on the true geometry, the true materials), both
        [V, 8] on the true voxels in the batch's voxel order, and [V] whether the voxel's sample has materials
        (real scans have none: the material terms leave them out)."""
        stats = latent_stats(self.latents_source, int(batch["resolution"]))
        pred = decode_on_true_geometry(self.frozen["vae"], batch, stats, material_latents)
        truth = batch["voxel_feats"].float().to(pred.device)
        has = batch["has_materials"].to(pred.device)[batch["voxel_coords"][:, 0].long().to(pred.device)]
        return pred, truth, has

    def count_units(self, batch: Any) -> int:
        return int(batch["coords"].shape[0])


__all__ = ["MaterialData", "MaterialTask", "decode_materials", "decode_on_true_geometry", "latent_stats",
           "material_flow_input", "subdivision", "true_rows"]
