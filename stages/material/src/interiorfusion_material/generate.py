"""Material generation: the material flow sampled on a geometry (the data's, or stage 2's generated one), decoded by
the VAE's material branch into per-voxel PBR materials.

    gen = load_material_generator("s3://…/material-output")   # or a pipeline run record / prefix
    scene = generate_scenes(structure_gen, batch)[0]          # stage 2: cells, geometry latents, voxels
    textured = texture_scene(gen, batch, 0, scene)            # stage 3: materials on those voxels
    textured_glb(textured.voxels, textured.materials, ...)    # interiorfusion_material.export
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from interiorfusion_core.errors import UserError
from interiorfusion_core.manifest import read_manifest
from interiorfusion_core.storage import open_store
from interiorfusion_material.config import DiTMaterialConfig, MaterialSamplingConfig
from interiorfusion_material.model import MaterialModel
from interiorfusion_material.task import decode_materials, denormalize, latent_stats, material_flow_input
from interiorfusion_structure.flow import ALL, guided, sample_ode
from interiorfusion_structure.generate import branch_drops, sampling_guidance, structure_instance

GENERATION_FORMAT = "interiorfusion.material-generation/1"


@dataclass
class MaterialGenerator:
    """What material sampling needs: the trained network, its frozen condition encoders and the VAE, the latent
    normalisation per resolution."""

    model: MaterialModel
    vae: nn.Module
    frozen: Mapping[str, nn.Module]
    config: DiTMaterialConfig
    stats: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]
    compression: int
    resolution: int
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@dataclass
class TexturedScene:
    """One room with materials: voxels at `resolution` and their [V, 8] materials (albedo RGB, metallic,
    roughness, normal XYZ), classes when the geometry decoder predicts them, in the frame origin + voxel · size."""

    voxels: np.ndarray
    materials: np.ndarray
    classes: np.ndarray
    resolution: int
    origin: np.ndarray
    cube_size: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def voxel_size(self) -> float:
        return self.cube_size / self.resolution

    def points(self) -> np.ndarray:
        return self.origin + (self.voxels + 0.5) * self.voxel_size


@torch.no_grad()
def sample_material_latents(gen: MaterialGenerator, batch: Mapping[str, Any], coords: torch.Tensor,
                            num_tokens: torch.Tensor, geometry: torch.Tensor, level: float,
                            sampling: MaterialSamplingConfig | None = None, resolution: int | None = None
                            ) -> torch.Tensor:
    """Normalised material latents [T, L] on the cells `coords` [T, 4] given their normalised geometry latents,
    sampled by the ODE from the condition fields of `batch` (one condition view per sample)."""
    from interiorfusion_structure.conditions import frozen_features

    sampling = sampling or gen.config.sampling
    model, device = gen.model.eval(), gen.device
    N = resolution or gen.resolution
    R = N // gen.compression
    B = len(batch["rgb"])
    cond_batch = {**batch, **frozen_features(gen.frozen, batch, None)}
    guidance = sampling_guidance(sampling)
    conds = {d: model.encode_conditions(cond_batch, branch_drops(model, B, d, device)) for d in guidance.branches()}
    levels = torch.full((B,), float(level), device=device)
    coords, geometry = coords.to(device), geometry.to(device).float()

    def keep_for(drop: frozenset[str]) -> torch.Tensor:
        lose = ALL in drop or "depth" in drop
        return torch.full((B,), not lose, dtype=torch.bool, device=device)

    def velocity(x: torch.Tensor, t: torch.Tensor, drop: frozenset[str]) -> torch.Tensor:
        inp = material_flow_input(gen.config, batch, R, coords, num_tokens, x, t, levels, geometry, keep_for(drop))
        return model.velocity(inp, conds[drop]).float()

    g = torch.Generator(device="cpu").manual_seed(sampling.seed)
    x0 = torch.randn(len(coords), model.latent_channels, generator=g).to(device)
    return sample_ode(guided(velocity, guidance), x0, B, sampling.steps, gen.config.flow_matching.t_range,
                      sampling.method)


@torch.no_grad()
def texture_scenes(gen: MaterialGenerator, batch: Mapping[str, Any], scenes: list[Any],
                   sampling: MaterialSamplingConfig | None = None) -> list[TexturedScene]:
    """Materials for stage 2's generated scenes (GeneratedScene with `latents`: its raw geometry latents per
    cell), sampled with the geometry-noise level `geometry.generated_noise`, decoded freely (no true geometry)."""
    if any(s.latents is None for s in scenes):
        raise UserError("texture_scenes needs generated scenes that carry their geometry latents (stage 2's "
                        "generate_scenes output)")
    N = scenes[0].resolution
    R = N // gen.compression
    device = gen.device
    stats = gen.stats[N]
    coords = torch.cat([torch.cat([torch.full((len(s.cells), 1), b, dtype=torch.int32),
                                   torch.as_tensor(s.cells, dtype=torch.int32)], 1) for b, s in enumerate(scenes)])
    counts = torch.tensor([len(s.cells) for s in scenes], dtype=torch.int64)
    raw_geo = torch.cat([torch.as_tensor(s.latents, dtype=torch.float32) for s in scenes]).to(device)
    geo_norm = (raw_geo - stats["geometry"][0].to(device)) / stats["geometry"][1].to(device)
    x1 = sample_material_latents(gen, batch, coords.to(device), counts, geo_norm, gen.config.geometry.generated_noise,
                                 sampling, N)
    geo, mats = decode_materials(gen.vae, coords, raw_geo, denormalize(x1, stats["material"]), len(scenes), R,
                                 gen.compression)
    keep = geo.occupancy_logits.reshape(-1) > 0
    vox = geo.voxels.coords[keep].cpu()
    mats = mats[keep].float().cpu()
    classes = (geo.class_logits[keep].argmax(-1).cpu() if geo.class_logits is not None
               else torch.zeros(int(keep.sum()), dtype=torch.long))
    out = []
    for b, s in enumerate(scenes):
        rows = vox[:, 0] == b
        out.append(TexturedScene(vox[rows, 1:].numpy().astype(np.int64), mats[rows].numpy(), classes[rows].numpy(),
                                 N, np.asarray(s.origin, np.float64), float(s.cube_size),
                                 {**s.meta, "material_steps": (sampling or gen.config.sampling).steps}))
    return out


# ------------------------------------------------------------------------------------------------ loading
def resolve_stage_uri(source: str, stage: str) -> str | None:
    """The output of `stage` for what a user has: a stage output prefix (its own stage or, for a material output,
    its structure input), a pipeline run record (…/runs/<id>.json) or a pipeline prefix (runs/latest.json).
    None when that pipeline or output has no such stage."""
    if source.endswith(".json"):
        parent, _, name = source.rstrip("/").rpartition("/")
        return _from_record(open_store(parent).get_json(name), stage)
    store = open_store(source)
    if store.exists("manifest.json"):
        manifest = read_manifest(store)
        if manifest.stage == stage or (stage == "structure" and "structure_weights" in manifest.outputs):
            return store.uri  # a structure output, or a fine-tuned one (LoRA, GRPO)
        if stage in manifest.inputs:  # material → its structure; a fine-tune → its material
            return manifest.inputs[stage].uri
        if "lora" in manifest.inputs:  # GRPO after LoRA: the LoRA run's material
            return resolve_stage_uri(manifest.inputs["lora"].uri, stage)
        return None
    if store.exists("runs/latest.json"):
        return _from_record(store.get_json("runs/latest.json"), stage)
    raise UserError(f"{source}: neither a stage output (no manifest.json) nor a pipeline (no runs/latest.json)")


def _from_record(record: Mapping[str, Any], stage: str) -> str | None:
    if stage == "structure":  # the most tuned structure model of the run
        name = structure_instance(record)
        return str(record["stages"][name]) if name else None
    names = [n for n, s in record.get("instances", {}).items() if s == stage]
    return str(record["stages"][names[-1]]) if names else None


def load_material_generator(uri: str, device: torch.device | str = "cpu", work_dir: Path | None = None
                            ) -> MaterialGenerator:
    """The trained material stage output at `uri`, with its VAE and frozen encoders, on `device`."""
    from safetensors.torch import load_file

    from interiorfusion_structure.conditions import build_frozen_encoders
    from interiorfusion_vae.stage import load_vae_output

    store = open_store(uri)
    manifest = read_manifest(store)
    if manifest.stage != "material":
        raise UserError(f"{uri}: is an output of stage '{manifest.stage}', not of the material stage")
    config = DiTMaterialConfig.model_validate(manifest.config)
    latents_uri = manifest.inputs["latents"].uri
    info = store.get_json("generation.json", manifest.artifacts["generation.json"].sha256)
    vae = load_vae_output(latents_uri, device)
    model = MaterialModel(config, int(info["latent_channels"]))
    with tempfile.TemporaryDirectory(prefix="interiorfusion-material-") as tmp:
        where = Path(work_dir or tmp)
        local = store.get_file(f"{manifest.outputs['checkpoint']}/model.safetensors", where / "material.safetensors")
        model.load_state_dict(load_file(str(local)))
        frozen = dict(build_frozen_encoders(config.model.conditioning))
        for name, module in frozen.items():
            key = f"frozen/{name}.safetensors"
            if key in manifest.artifacts:
                module.load_state_dict(load_file(str(store.get_file(key, where / f"{name}.st"))))
    for m in frozen.values():
        m.requires_grad_(False).eval().to(device)
    stats = {int(r): latent_stats(latents_uri, int(r)) for r in info["resolutions"]}
    return MaterialGenerator(model.to(device).eval(), vae, frozen, config, stats, int(info["compression"]),
                             int(info["resolution"]), info)


def generation_info(config: DiTMaterialConfig, latent_channels: int, compression: int, resolutions: list[int],
                    resolution: int) -> dict[str, Any]:
    return {"format": GENERATION_FORMAT, "latent_channels": latent_channels, "compression": compression,
            "resolutions": [int(r) for r in resolutions], "resolution": int(resolution),
            "sampling": config.sampling.model_dump(), "geometry": config.geometry.model_dump()}


__all__ = ["MaterialGenerator", "TexturedScene", "generation_info", "load_material_generator", "resolve_stage_uri",
           "sample_material_latents", "texture_scenes"]
