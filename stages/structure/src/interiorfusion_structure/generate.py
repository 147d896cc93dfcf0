"""Scene generation from conditions alone: coarse occupancy flow → latent flow on its cells → VAE geometry decoder.

    gen = load_generator("s3://…/structure-output")            # or a pipeline run record (interiorfusion generate)
    scenes = generate_scenes(gen, batch)                        # batch: one condition view per sample
    scene_glb(scenes[0]); scene_preview(scenes[0], batch, 0)    # textured-by-class .glb, preview from the camera

Frame: a scene is generated in the data's gravity-aligned voxel frame (z up, the room inside origin + [0,
cube_size]³), where the condition camera's pose is a further condition; metres follow from the frame's cube size
(the metric frame's 10.24 m unless the data used per-scene cubes). The .glb is in metres, converted to glTF's
y-up convention.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from interiorfusion_core.errors import UserError
from interiorfusion_core.manifest import read_manifest
from interiorfusion_core.storage import open_store
from interiorfusion_structure.attention import Segments
from interiorfusion_structure.config import DiTStructureConfig, SamplingConfig
from interiorfusion_structure.flow import ALL, Guidance, guided, sample_ode
from interiorfusion_structure.model import FlowInput, StructureModel, grid_coords, patchify, unpatchify

log = logging.getLogger("interiorfusion_structure")


@dataclass
class GeneratedScene:
    """One generated room: latent cells, decoded voxels at the data resolution and their classes, in its frame."""

    cells: np.ndarray  # [M, 3] latent-grid cells
    voxels: np.ndarray  # [V, 3] int voxel coords at `resolution`
    classes: np.ndarray  # [V] class ids
    resolution: int
    origin: np.ndarray  # [3] metres
    cube_size: float
    meta: dict[str, Any] = field(default_factory=dict)
    # [M, L] the generated geometry latents of `cells` in the VAE's own (denormalised) space: what stage 3's
    # materials are sampled on. None for scenes that did not come from the sampler (truths, baselines).
    latents: np.ndarray | None = None

    @property
    def voxel_size(self) -> float:
        return self.cube_size / self.resolution

    def points(self) -> np.ndarray:
        """Voxel centres in metres (the frame's world coordinates)."""
        return self.origin + (self.voxels + 0.5) * self.voxel_size


@dataclass
class Generator:
    """What generation needs: the trained network, the frozen encoders and VAE, normalisation per resolution."""

    model: StructureModel
    vae: torch.nn.Module
    frozen: Mapping[str, torch.nn.Module]
    config: DiTStructureConfig
    stats: dict[int, tuple[torch.Tensor, torch.Tensor]]  # resolution → (mean, std) of the geometry channels
    compression: int
    resolution: int
    defaults: dict[str, Any] = field(default_factory=dict)  # default camera, frame, image size (generation.json)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


# ------------------------------------------------------------------------------------------------ sampling
def branch_drops(model: torch.nn.Module, batch_size: int, drop: frozenset[str], device: torch.device
                 ) -> dict[str, torch.Tensor] | None:
    """The `drop` argument of a model's condition encoder for one guidance branch (every sample drops the same)."""
    if not drop:
        return None
    names = model.conditions.modalities if ALL in drop else sorted(m for m in drop if m in model.conditions.modalities)
    return {m: torch.ones(batch_size, dtype=torch.bool, device=device) for m in names}


def sampling_guidance(sampling: SamplingConfig) -> Guidance:
    return Guidance(sampling.cfg_scale, dict(sampling.cfg_modality))


@torch.no_grad()
def generate_scenes(gen: Generator, batch: Mapping[str, Any], sampling: SamplingConfig | None = None,
                    resolution: int | None = None) -> list[GeneratedScene]:
    """Generate one scene per sample of `batch` (condition fields, see task.StructureData.collate; no latents
    needed) at `resolution` (default: the generator's)."""
    from interiorfusion_structure.conditions import frozen_features
    from interiorfusion_structure.lifting import cell_values, patch_values
    from interiorfusion_structure.task import lifted_depth

    sampling = sampling or gen.config.sampling
    model, device = gen.model.eval(), gen.device
    N = resolution or gen.resolution
    R = N // gen.compression
    B = len(batch["rgb"])
    cond_batch = {**batch, **frozen_features(gen.frozen, batch, None)}
    guidance = sampling_guidance(sampling)
    conds = {d: model.encode_conditions(cond_batch, branch_drops(model, B, d, device)) for d in guidance.branches()}
    g = torch.Generator(device="cpu").manual_seed(sampling.seed)

    # 1. Coarse occupancy of the latent grid.
    p = min(gen.config.occupancy.patch, R)
    _, o_coords = patchify(torch.zeros(B, R, R, R, device=device), p)
    o_coords = o_coords.to(device)
    per = len(o_coords) // B
    o_segs = Segments.from_lengths([per] * B).to(device)

    # The lifted condition depth per token; the branches that drop the depth (or everything) see none.
    lifted = lifted_depth(batch, R) if gen.config.model.lift_depth else None

    def lift_for(drop: frozenset[str]) -> torch.Tensor | None:
        if lifted is None:
            return None
        return torch.zeros_like(lifted) if (ALL in drop or "depth" in drop) else lifted

    o_lift = {d: None if lift_for(d) is None else patch_values(lift_for(d), p) for d in guidance.branches()}

    def occ_velocity(x: torch.Tensor, t: torch.Tensor, drop: frozenset[str]) -> torch.Tensor:
        return model.velocity("occupancy", FlowInput(x, o_coords, o_segs, t, o_lift[drop]), conds[drop]).float()

    o0 = torch.randn(len(o_coords), p**3, generator=g).to(device)
    occ = sample_ode(guided(occ_velocity, guidance), o0, B, sampling.occupancy_steps,
                     gen.config.flow_matching.t_range, sampling.method)
    cells, counts = occupied_cells(unpatchify(occ, B, R, p), sampling.occupancy_threshold)
    segs = Segments.from_lengths(counts.cpu()).to(device)

    # 2. Geometry latents on those cells.
    c_lift = {d: None if lift_for(d) is None else cell_values(lift_for(d), cells) for d in guidance.branches()}

    def lat_velocity(x: torch.Tensor, t: torch.Tensor, drop: frozenset[str]) -> torch.Tensor:
        return model.velocity("latent", FlowInput(x, cells, segs, t, c_lift[drop]), conds[drop]).float()

    x0 = torch.randn(len(cells), model.latent_channels, generator=g).to(device)
    x1 = sample_ode(guided(lat_velocity, guidance), x0, B, sampling.steps, gen.config.flow_matching.t_range,
                    sampling.method)

    # 3. Decode with the VAE's geometry branch.
    return decode_scenes(gen.vae, cells, counts, x1, gen.stats[N], gen.compression, N, batch,
                         {"sampler": sampling.method, "steps": sampling.steps, "cfg_scale": sampling.cfg_scale,
                          "seed": sampling.seed})


def occupied_cells(grid: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """([T, 4] the latent cells (sample, x, y, z) of a sampled occupancy grid [B, R, R, R] above `threshold`, [B]
    the cells per scene). A scene has at least one cell: its most confident."""
    occupied = grid > threshold
    for b in range(len(grid)):
        if not bool(occupied[b].any()):
            occupied[b].view(-1)[grid[b].view(-1).argmax()] = True
    cells = grid_coords(occupied).to(grid.device)
    return cells, torch.bincount(cells[:, 0].long(), minlength=len(grid))


@torch.no_grad()
def decode_scenes(vae: torch.nn.Module, cells: torch.Tensor, counts: torch.Tensor, latents: torch.Tensor,
                  stats: tuple[torch.Tensor, torch.Tensor], compression: int, resolution: int,
                  batch: Mapping[str, Any], meta: Mapping[str, Any]) -> list[GeneratedScene]:
    """One GeneratedScene per sample of `batch` from its sampled (normalised) geometry `latents` on `cells`:
    denormalised into the VAE's own latent space and decoded by its geometry branch; `meta` (how they were
    sampled) goes into every scene's meta beside its key."""
    from interiorfusion_vae.latents import decode_geometry

    device = latents.device
    mean, std = stats
    raw = latents * std.to(device) + mean.to(device)
    vae_dtype = next(vae.parameters()).dtype
    geo = decode_geometry(vae, {"coords": cells, "feats": raw.to(vae_dtype), "num_tokens": counts,
                                "latent_resolution": resolution // compression, "compression": compression})
    keep = geo.occupancy_logits.reshape(-1) > 0
    vox = geo.voxels.coords[keep].cpu()
    classes = (geo.class_logits[keep].argmax(-1).cpu() if geo.class_logits is not None
               else torch.zeros(int(keep.sum()), dtype=torch.long))
    scenes = []
    raw_cpu = raw.float().cpu()
    for b in range(len(counts)):
        rows = vox[:, 0] == b
        own = (cells[:, 0] == b).cpu()
        scenes.append(GeneratedScene(
            cells=cells[own.to(cells.device), 1:].cpu().numpy(), latents=raw_cpu[own].numpy(),
            voxels=vox[rows, 1:].numpy().astype(np.int64), classes=classes[rows].numpy(), resolution=resolution,
            origin=np.asarray(batch["origin"][b].cpu(), np.float64), cube_size=float(batch["cube_size"][b]),
            meta={"key": batch["keys"][b] if "keys" in batch else None, **meta},
        ))
    return scenes


# ------------------------------------------------------------------------------------------------ scoring
def scene_scores(pred: GeneratedScene | np.ndarray, truth_points: np.ndarray, thresholds: Sequence[float],
                 max_points: int = 20000, seed: int = 0) -> dict[str, float]:
    """Chamfer distance (metres: the mean of both directions' mean nearest-neighbour distances) and F-score at
    each threshold (metres) between a generated scene's voxel centres and the true ones."""
    from scipy.spatial import cKDTree

    p = pred.points() if isinstance(pred, GeneratedScene) else np.asarray(pred, np.float64)
    t = np.asarray(truth_points, np.float64)
    rng = np.random.default_rng(seed)
    if len(p) > max_points:
        p = p[rng.choice(len(p), max_points, replace=False)]
    if len(t) > max_points:
        t = t[rng.choice(len(t), max_points, replace=False)]
    if len(p) == 0 or len(t) == 0:
        return {"chamfer_m": float("inf"), **{f"fscore_{th:g}m": 0.0 for th in thresholds}}
    d_p = cKDTree(t).query(p, k=1)[0]
    d_t = cKDTree(p).query(t, k=1)[0]
    out = {"chamfer_m": float(0.5 * (d_p.mean() + d_t.mean()))}
    for th in thresholds:
        prec, rec = float((d_p <= th).mean()), float((d_t <= th).mean())
        out[f"fscore_{th:g}m"] = 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0
    return out


# ------------------------------------------------------------------------------------------------ outputs
def class_colors() -> np.ndarray:
    from interiorfusion_data.preview import PALETTE

    return PALETTE


def scene_glb(scene: GeneratedScene) -> bytes:
    """The scene as a binary glTF: one box mesh per class (exposed voxel faces only), each with a PBR material of
    the class's colour and name, in metres, y up."""
    import trimesh

    from interiorfusion_data.scene import CLASSES

    palette = class_colors()
    glb = trimesh.Scene()
    occupied = {tuple(v) for v in scene.voxels.tolist()}
    # z-up frame → glTF y-up: (x, y, z) ↦ (x, z, −y).
    to_y_up = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]], np.float64)
    for cls in np.unique(scene.classes):
        vox = scene.voxels[scene.classes == cls]
        verts, faces = exposed_faces(vox, occupied)
        if not len(faces):
            continue
        points = scene.origin + verts * scene.voxel_size
        mesh = trimesh.Trimesh(points, faces, process=False)
        color = np.append(palette[int(cls) % len(palette)], 255).astype(np.uint8)
        name = CLASSES[int(cls)] if int(cls) < len(CLASSES) else f"class_{int(cls)}"
        mesh.visual = trimesh.visual.TextureVisuals(material=trimesh.visual.material.PBRMaterial(
            name=name, baseColorFactor=color, metallicFactor=0.0, roughnessFactor=0.8))
        glb.add_geometry(mesh, node_name=name, geom_name=name, transform=to_y_up)
    if not glb.geometry:
        raise UserError("the generated scene has no voxels to write")
    return glb.export(file_type="glb")


# Per face direction: the neighbour offset and the face's corners (unit-cube offsets, counter-clockwise seen from
# outside).
_FACE_DIRS = [(np.array(d), q) for d, q in [
    ((-1, 0, 0), [(0, 0, 0), (0, 0, 1), (0, 1, 1), (0, 1, 0)]),
    ((1, 0, 0), [(1, 0, 0), (1, 1, 0), (1, 1, 1), (1, 0, 1)]),
    ((0, -1, 0), [(0, 0, 0), (1, 0, 0), (1, 0, 1), (0, 0, 1)]),
    ((0, 1, 0), [(0, 1, 0), (0, 1, 1), (1, 1, 1), (1, 1, 0)]),
    ((0, 0, -1), [(0, 0, 0), (0, 1, 0), (1, 1, 0), (1, 0, 0)]),
    ((0, 0, 1), [(0, 0, 1), (1, 0, 1), (1, 1, 1), (0, 1, 1)]),
]]


def exposed_faces(vox: np.ndarray, occupied: set[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Quads of the voxel faces of `vox` whose neighbour is not in `occupied` (outward winding), as triangles:
    vertices [4·Q, 3] in voxel units (4 corners per quad, counter-clockwise seen from outside), faces [2·Q, 3]."""
    verts, faces = [], []
    n = 0
    for d, quad in _FACE_DIRS:
        nb = vox + d
        exposed = np.array([tuple(v) not in occupied for v in nb.tolist()], bool) if len(vox) else np.zeros(0, bool)
        base = vox[exposed]
        if not len(base):
            continue
        corners = base[:, None, :] + np.array(quad)[None]  # [F, 4, 3]
        verts.append(corners.reshape(-1, 3))
        idx = n + np.arange(len(base))[:, None] * 4
        faces.append(np.concatenate([idx + np.array([0, 1, 2]), idx + np.array([0, 2, 3])]))
        n += 4 * len(base)
    if not verts:
        return np.zeros((0, 3)), np.zeros((0, 3), np.int64)
    return np.concatenate(verts).astype(np.float64), np.concatenate(faces).astype(np.int64)


_exposed_faces = exposed_faces  # the former private name


def render_scene(scene: GeneratedScene, K: torch.Tensor, cam_to_world: torch.Tensor, height: int, width: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(RGB by class colour [H, W, 3] uint8 on white, depth [H, W] metres) of the scene from a camera."""
    from interiorfusion_vae.render import soft_render

    if not len(scene.voxels):
        return np.full((height, width, 3), 255, np.uint8), np.zeros((height, width))
    points = torch.from_numpy(scene.points())
    colors = torch.from_numpy(class_colors()[scene.classes % len(class_colors())].astype(np.float64) / 255.0)
    r = soft_render(points, torch.ones(len(points), dtype=torch.float64), K.double().cpu(),
                    cam_to_world.double().cpu(), height, width, scene.voxel_size, features=colors)
    alpha = r.alpha.numpy()[..., None]
    rgb = r.features.numpy() * alpha + (1 - alpha)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8), r.depth.numpy()


def scene_preview(scene: GeneratedScene, batch: Mapping[str, Any], b: int, truth: GeneratedScene | None = None,
                  tile: int = 192) -> bytes:
    """PNG: the condition image | the generated scene from the condition camera (classes) | its depth
    [| the true scene from the same camera]."""
    from PIL import Image

    from interiorfusion_data.preview import colorize_depth

    rgb = batch["rgb"][b].float().cpu()
    H, W = rgb.shape[-2:]
    K, pose = batch["intrinsics"][b], batch["cam_to_world"][b]
    image = (rgb.permute(1, 2, 0).numpy().clip(0, 1) * 255).astype(np.uint8)
    color, depth = render_scene(scene, K, pose, H, W)
    tiles = [image, color, colorize_depth(depth)]
    if truth is not None:
        tiles.append(render_scene(truth, K, pose, H, W)[0])
    sheet = Image.new("RGB", (tile * len(tiles), tile), "white")
    for i, arr in enumerate(tiles):
        sheet.paste(Image.fromarray(arr).resize((tile, tile * H // W), Image.NEAREST), (i * tile, 0))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ loading
def resolve_structure_uri(source: str) -> str:
    """A structure stage output from what a user has: the output prefix itself, a pipeline run record
    (`…/runs/<id>.json`) or a pipeline prefix (its `runs/latest.json`)."""
    if source.endswith(".json"):
        parent, _, name = source.rstrip("/").rpartition("/")
        record = open_store(parent).get_json(name)
        return _structure_from_record(record, source)
    store = open_store(source)
    if store.exists("manifest.json"):
        return store.uri
    if store.exists("runs/latest.json"):
        return _structure_from_record(store.get_json("runs/latest.json"), f"{store.uri}/runs/latest.json")
    raise UserError(f"{source}: neither a stage output (no manifest.json) nor a pipeline (no runs/latest.json)")


# Stages whose outputs hold structure weights, the most tuned first: a pipeline run generates with the last of them.
STRUCTURE_SOURCES = ("grpo", "lora", "structure")


def structure_instance(record: Mapping[str, Any]) -> str | None:
    """The instance of a pipeline run record whose output generation uses: its most tuned structure model."""
    instances = record.get("instances", {})
    for stage in STRUCTURE_SOURCES:
        names = [n for n, s in instances.items() if s == stage]
        if names:
            return names[-1]
    return None


def _structure_from_record(record: Mapping[str, Any], where: str) -> str:
    name = structure_instance(record)
    if name is None:
        raise UserError(f"{where}: this pipeline run has no structure stage (instances: "
                        f"{', '.join(record.get('instances', {}))})")
    return str(record["stages"][name])


def load_generator(source: str, device: torch.device | str = "cpu", work_dir: Path | None = None) -> Generator:
    """The trained structure stage at `source` (see resolve_structure_uri) with its VAE, on `device`."""
    import tempfile

    from safetensors.torch import load_file

    from interiorfusion_structure.conditions import build_frozen_encoders
    from interiorfusion_structure.task import geometry_stats
    from interiorfusion_vae.stage import load_vae_output

    uri = resolve_structure_uri(source)
    store = open_store(uri)
    manifest = read_manifest(store)
    if manifest.stage != "structure":
        return _tuned_generator(uri, manifest, device, work_dir)
    config = DiTStructureConfig.model_validate(manifest.config)
    latents_uri = manifest.inputs["latents"].uri
    vae = load_vae_output(latents_uri, device)
    info = store.get_json("generation.json", manifest.artifacts["generation.json"].sha256)
    model = StructureModel(config, int(info["latent_channels"]))
    with tempfile.TemporaryDirectory(prefix="interiorfusion-generate-") as tmp:
        local = store.get_file(f"{manifest.outputs['checkpoint']}/model.safetensors",
                               Path(work_dir or tmp) / "structure.safetensors")
        model.load_state_dict(load_file(str(local)))
        frozen = dict(build_frozen_encoders(config.model.conditioning))
        for name, module in frozen.items():
            key = f"frozen/{name}.safetensors"
            if key in manifest.artifacts:  # random-init encoders: the exact weights training used
                module.load_state_dict(load_file(str(store.get_file(key, Path(work_dir or tmp) / f"{name}.st"))))
    stats = {int(res): geometry_stats(latents_uri, int(res)) for res in info["resolutions"]}
    for m in frozen.values():
        m.requires_grad_(False).eval().to(device)
    return Generator(model.to(device).eval(), vae, frozen, config, stats, int(info["compression"]),
                     int(info["resolution"]), info)


def _tuned_generator(uri: str, manifest: Any, device: torch.device | str, work_dir: Path | None) -> Generator:
    """A fine-tuning stage's output (LoRA, GRPO): its base structure generator with the tuned weights it wrote
    (`outputs.structure_weights`: the base class's state dict, adapters merged)."""
    import tempfile

    from safetensors.torch import load_file

    if "structure" not in manifest.inputs:
        raise UserError(f"{uri}: is an output of stage '{manifest.stage}', not of the structure stage")
    key = manifest.outputs.get("structure_weights")
    if key is None:
        raise UserError(f"{uri}: this {manifest.stage} run wrote no merged structure weights (lora.merge was false); "
                        "rerun it with lora.merge: true, or load its adapters with peft")
    gen = load_generator(manifest.inputs["structure"].uri, device, work_dir)
    with tempfile.TemporaryDirectory(prefix="interiorfusion-generate-") as tmp:
        local = open_store(uri).get_file(key, Path(work_dir or tmp) / "tuned-structure.safetensors",
                                         manifest.artifacts[key].sha256)
        gen.model.load_state_dict(load_file(str(local)))
    gen.model.to(device).eval()
    gen.defaults = {**gen.defaults, "tuned": {"stage": manifest.stage, "uri": uri}}
    return gen


def generation_info(config: DiTStructureConfig, latent_channels: int, compression: int, resolutions: Sequence[int],
                    resolution: int, camera: Mapping[str, Any], image_size: Sequence[int], cube_size: float,
                    frame_kind: str) -> dict[str, Any]:
    """generation.json: what `interiorfusion generate` needs beside the weights (a default camera in the frame,
    the training images' size, the frame's cube size)."""
    return {"format": "interiorfusion.structure-generation/1", "latent_channels": latent_channels,
            "compression": compression, "resolutions": [int(r) for r in resolutions], "resolution": int(resolution),
            "camera": dict(camera), "image_size": [int(v) for v in image_size], "cube_size": float(cube_size),
            "frame_kind": frame_kind, "sampling": config.sampling.model_dump()}


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
