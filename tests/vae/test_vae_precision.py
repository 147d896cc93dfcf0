"""bf16 training of the VAE: features and weights go low-precision, geometry does not. Voxel centres, cameras, true
depth and normal maps stay float32 through `VAETask.to_device`, the renderer projects in float32 under autocast, and
one training step of the smoke VAE runs with finite losses and gradients both ways the engine runs bf16 (autocast
for plain/DDP runs, bf16 weights and inputs under DeepSpeed)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import yaml
from testservers import REPO

from interiorfusion_core.engine import StepContext
from interiorfusion_core.engine.distributed import Runtime
from interiorfusion_vae.config import VAEPretrainConfig
from interiorfusion_vae.losses import voxel_centres
from interiorfusion_vae.render import soft_render
from interiorfusion_vae.task import VAETask, build_vae

CPU = torch.device("cpu")
BF16 = torch.bfloat16


def runtime(deepspeed: bool) -> Runtime:
    """The engine's bf16 runtime on this CPU (the engine itself only picks bf16 on CUDA): autocast for plain and
    DDP runs; under DeepSpeed no autocast, bf16 weights and inputs cast by the task (`input_dtype`)."""
    return Runtime(accelerator=None, device=CPU, rank=0, world_size=1, deepspeed=deepspeed,
                   zero_stage=3 if deepspeed else None, precision="bf16")


def smoke_config() -> VAEPretrainConfig:
    """configs/smoke/vae.yaml (its widths, losses and render views) shrunk to one 32³ phase."""
    cfg = yaml.safe_load((REPO / "configs/smoke/vae.yaml").read_text())
    cfg["model"] |= {"base_resolution": 32, "target_resolution": 32}
    cfg["training"] |= {"curriculum": [], "max_steps": 1}
    return VAEPretrainConfig.model_validate(cfg)


def scene_batch(scenes: int = 2, resolution: int = 32, views: int = 2) -> dict[str, Any]:
    """Procedural rooms built in memory (no shards) and collated like a training batch."""
    from interiorfusion_data.config import DataStageConfig
    from interiorfusion_data.format import decode_sample
    from interiorfusion_data.loader import collate_scenes
    from interiorfusion_data.pipeline import build_sample, procedural_options
    from interiorfusion_data.procedural import generate_scene

    cfg = DataStageConfig(seed=0, num_scenes=scenes, voxel={"resolutions": [resolution], "cube_size": "fit"},
                          render={"views": views, "image_size": 32})
    samples = [build_sample(generate_scene(0, i, procedural_options(cfg)), cfg, i) for i in range(scenes)]
    return collate_scenes([decode_sample(s.members, resolution, fields=("voxels", "views"), views=views)
                           for s in samples])


GEOMETRY = ("origin", "voxel_size", "intrinsics", "cam_to_world", "depth", "normal")


def test_to_device_casts_features_only() -> None:
    batch = scene_batch(scenes=1)
    task = VAETask(smoke_config(), data_uri="")
    moved = task.to_device(batch, CPU, BF16)
    assert moved["feats"].dtype == BF16
    for key in GEOMETRY:
        assert moved[key].dtype == torch.float32, key
    assert moved["coords"].dtype == batch["coords"].dtype and moved["labels"].dtype == torch.int64
    # float64 runs (the GPU check's parity) keep float64 everywhere; fp32 runs leave the batch's dtypes alone.
    assert all(task.to_device(batch, CPU, torch.float64)[k].dtype == torch.float64 for k in ("feats", *GEOMETRY))
    assert all(task.to_device(batch, CPU, None)[k].dtype == batch[k].dtype for k in ("feats", *GEOMETRY))


def test_voxel_centres_near_5m_keep_sub_millimetre_precision_under_bf16() -> None:
    """A 1024³ grid of 1 cm voxels (a 10.24 m cube): voxels 480…540 along each axis have centres 4.7–5.5 m out."""
    g = torch.arange(480, 541, 6)
    xyz = torch.cartesian_prod(g, g, g)
    coords = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.int64), xyz], 1).int()
    batch = {"origin": torch.tensor([[-0.1234, 0.0567, -0.0089]]), "voxel_size": torch.tensor([10.24 / 1024]),
             "feats": torch.rand(len(coords), 8), "coords": coords}
    exact = batch["origin"].double() + (xyz.double() + 0.5) * batch["voxel_size"].double()
    assert float(exact.min()) > 4.6 and float(exact.max()) < 5.5

    moved = VAETask(smoke_config(), data_uri="").to_device(batch, CPU, BF16)
    centres = voxel_centres(moved["coords"], moved["origin"], moved["voxel_size"])
    err = float((centres.double() - exact).abs().max())
    assert centres.dtype == torch.float32
    assert err < 1e-5, f"{err * 1e3:.4f} mm"  # measured 2.4e-7 m: float32 rounding of a 5 m value

    # The scenario is sensitive: centres from bf16 inputs in bf16 arithmetic (the former path) are off by 3.9 cm.
    o, s = batch["origin"].to(BF16), batch["voxel_size"].to(BF16)
    old = o[coords[:, 0].long()] + (coords[:, 1:].to(BF16) + 0.5) * s[coords[:, 0].long(), None]
    assert float((old.double() - exact).abs().max()) > 5e-3


def _wall(z: float, voxel: float = 0.01, half: float = 1.2) -> torch.Tensor:
    g = torch.arange(-half, half, voxel, dtype=torch.float64) + voxel / 2
    yy, xx = torch.meshgrid(g, g, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten(), torch.full_like(xx.flatten(), z)], dim=1).float()


def test_soft_render_projects_in_float32_under_bf16_autocast() -> None:
    """A wall 5.005 m in front of a camera 1 m from the origin: bf16 would put it at 5.0 or 5.03 m."""
    K = torch.tensor([[40.0, 0, 16], [0, 40.0, 16], [0, 0, 1]])
    pose = torch.eye(4)
    pose[:3, 3] = torch.tensor([0.6, -0.8, 0.0])  # camera 1 m from the world origin, looking along +z
    pts = _wall(5.005) + pose[:3, 3]
    logits = torch.full((len(pts),), 4.0, dtype=BF16, requires_grad=True)
    normals = torch.nn.functional.normalize(torch.randn(len(pts), 3), dim=1).to(BF16)
    with torch.autocast("cpu", dtype=BF16):
        out = soft_render(pts, torch.sigmoid(logits), K, pose, 32, 32, 0.01, features=normals)
        loss = (out.depth[10:22, 10:22] - 5.0).abs().mean() + out.features.square().mean()
    assert out.depth.dtype == out.alpha.dtype == out.features.dtype == torch.float32
    assert torch.allclose(out.depth[10:22, 10:22], torch.full((12, 12), 5.005), atol=1e-4)
    ref = soft_render(pts, torch.sigmoid(logits.detach().float()), K, pose, 32, 32, 0.01, features=normals.float())
    assert torch.allclose(out.depth, ref.depth, atol=1e-5)
    loss.backward()
    assert logits.grad is not None and logits.grad.dtype == BF16 and bool(torch.isfinite(logits.grad).all())


@pytest.mark.parametrize("deepspeed", [False, True], ids=["autocast", "deepspeed-bf16"])
def test_bf16_training_step_of_the_smoke_vae(deepspeed: bool) -> None:
    config = smoke_config()
    task = VAETask(config, data_uri="")
    batch = scene_batch()
    torch.manual_seed(0)
    model = build_vae(config)
    model.set_material_prior(batch["feats"].mean(0))
    with torch.no_grad():  # the fp32 reference, same weights and noise
        torch.manual_seed(1)
        ref = task.compute_losses(model, task.to_device(batch, CPU))

    rt = runtime(deepspeed)
    if deepspeed:
        model = model.to(BF16)  # what DeepSpeed's bf16 engine trains
    step = StepContext(rt, model, model, {}, accumulation=1,
                       next_batch=lambda to_device: task.to_device(batch, rt.device, rt.input_dtype))
    torch.manual_seed(1)
    losses = task.train_step(step)  # the engine's default step: next batch, autocast, compute_losses, backward

    assert step.backwards == 1
    for name, value in losses.items():
        assert bool(torch.isfinite(value)), name
    # The render terms come out of the float32 renderer and track the fp32 run closely; the rest is bf16.
    for name in ("depth_consistency", "normal_consistency", "edge_preservation"):
        assert losses[name].dtype == torch.float32, name
        assert float(losses[name].detach()) == pytest.approx(float(ref[name]), rel=0.05), name
    assert float(losses["loss"].detach()) == pytest.approx(float(ref["loss"]), rel=0.05)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in params if p.grad is None]
    assert not missing, missing
    bad = [n for n, p in params if not bool(torch.isfinite(p.grad).all())]
    assert not bad, bad
    assert math.isfinite(float(torch.nn.utils.get_total_norm([p.grad.float() for _, p in params])))
