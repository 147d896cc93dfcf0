"""Sparse-conv and VAE parity on a device (CUDA by default): the numbers a GPU machine must reproduce before its
timings mean anything; then the VAE's bf16 training step and its encode job on that device.

    python bench/gpu_check.py [--device auto|cuda|cpu] [--checks parity,bf16,encode,dit] [--json parity.json]

--device auto (the default) is CUDA when torch sees a GPU, else CPU: on CPU the same checks run quickly (the
device-vs-CPU ones are then trivial; spconv-vs-torch is not). bench/gpu_check.sh passes --device cuda.

Every layer case runs a conv on a small random grid (batch 2, 16³, ~20 % occupied, 8 → 16 channels) and compares
the output rows and the gradients of input, weight and bias (for a fixed random upstream gradient) against a
reference run with the same weights:

    torch-f64   torch backend on the device in float64  vs  torch backend on CPU in float64     rel ≤ 1e-10
    torch-f32   torch backend on the device in float32  vs  torch backend on CPU in float64     rel ≤ 1e-4
    spconv-f32  spconv backend on the device in float32 vs  torch backend on the device, float32 rel ≤ 1e-4

(rel = max |a − b| / max |b| per tensor; TF32 is switched off so float32 means float32). Row coordinates must match
exactly. Two end-to-end cases run one training step of a tiny SLAT-Interior VAE (eval mode, so z = μ on every
device) on a 32³ procedural scene with rendered views: the loss terms and every parameter gradient on the device in
float64 against CPU float64 (rel ≤ 1e-8 on losses, 1e-7 on gradients), and the spconv backend against the torch
backend on the device in float32 without the render losses (their coverage masks are discontinuous, so float32
rounding could flip pixels): rel ≤ 1e-5 on losses, 5e-2 on gradients. That tolerance is loose on purpose: the
geometry encoder's first level gets a constant input (ones), and GroupNorm of a constant normalises rounding noise,
so in float32 the gradients there carry noise of ~1 % that differs with any change of summation order (1e-11 in
float64); a wrong map or weight layout shows up as errors of order 1. Gradient errors are relative to each
parameter's largest entry, floored at 1e-3 of the model's largest gradient (a conv bias followed by a GroupNorm
has a gradient that is zero up to rounding).
spconv cases are skipped, with the reason, when spconv does not import.

--checks bf16: the smoke VAE (configs/smoke/vae.yaml widths and losses; 128³ on CUDA, 32³ on CPU) trained in bf16 the
two ways the engine runs bf16: `autocast` (plain/DDP runs: fp32 weights under bf16 autocast) and `deepspeed-bf16`
(DeepSpeed's: bf16 weights and input features, no autocast; a plain AdamW stands in for DeepSpeed's optimizer).
Each runs the engine's default train_step plus an optimizer step: finite losses and gradients, render terms in
float32, the first loss within 10 % of fp32 at the same weights, and the median time per step after a warm-up.
--checks encode: the stage's encode job (`interiorfusion_vae.latents.encode_dataset`) with the model on the device
over a few procedural scenes written for it, timed per sample after a warm-up pass; latents finite and complete.
--checks dit: the Structure DiT's training step in bf16 under DeepSpeed ZeRO-3 (one process, `deepspeed.initialize`
with a ZeRO-3 + bf16 config and torch's AdamW: no DeepSpeed ops to compile) at the seed's size (width 1536, 30
blocks, 12 heads, MLP 8192, 1024-wide condition tokens; ~1.34B parameters) on packed sequences (--dit-samples ×
--dit-tokens latent tokens, 2113 condition tokens each), timed after --dit-warmup steps. MFU = model FLOPs per step
(forward + backward = 3 × the forward's linear, self- and cross-attention FLOPs, interiorfusion_structure.planning)
÷ step time ÷ the GPU's dense bf16 peak (H100 / H200: 989 TFLOPs); target ≥ 45 % (reported, not gated). On CPU
(or without DeepSpeed) a tiny DiT runs the same step with bf16 weights and a plain AdamW standing in for DeepSpeed:
it tests the path, its MFU means nothing. Passes when every loss and gradient is finite.
Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _src in (*(str(ROOT / "stages" / p / "src") for p in ("core", "data", "vae", "structure")), str(ROOT)):
    if _src not in sys.path:  # runnable from a checkout without installing the packages
        sys.path.insert(0, _src)

import torch  # noqa: E402

from bench._report import row, write_json  # noqa: E402
from interiorfusion_core.sparse import (  # noqa: E402
    SparseConv3d,
    SparseConvTranspose3d,
    SparseTensor,
    SubMConv3d,
    backend_status,
)

TOL = {"torch-f64": 1e-10, "torch-f32": 1e-4, "spconv-f32": 1e-4}
VAE_TOL = {"vae-torch-f64": (1e-8, 1e-7), "vae-spconv-f32": (1e-5, 5e-2)}  # (losses, gradients)


# ---- layer cases ----------------------------------------------------------------------------------------
def random_grid(seed: int = 0, shape: int = 16, batch: int = 2, channels: int = 8, density: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    occ = torch.rand(batch, shape, shape, shape, generator=g) < density
    coords = occ.nonzero().contiguous()
    feats = torch.randn(len(coords), channels, generator=g, dtype=torch.float64)
    return coords, feats, shape


Case = Callable[[str | None], tuple[torch.nn.Module, Callable[[torch.nn.Module, SparseTensor], SparseTensor]]]


def _plain(layer: Callable[[str | None], torch.nn.Module]) -> Case:
    return lambda backend: (layer(backend), lambda m, x: m(x))


def _onto_target(k: int, p: int) -> Case:
    """Transposed conv back onto the input's own level (the decoder's U-Net step): down k2 s2, then up onto x."""

    def make(backend: str | None):
        mod = torch.nn.ModuleDict({"down": SparseConv3d(8, 8, 2, 2, backend=backend),
                                   "up": SparseConvTranspose3d(8, 16, k, 2, p, backend=backend)})
        return mod, lambda m, x: m["up"](m["down"](x), target=x)

    return make


CASES: dict[str, Case] = {
    "subm k3": _plain(lambda b: SubMConv3d(8, 16, 3, backend=b)),
    "subm k5": _plain(lambda b: SubMConv3d(8, 16, 5, backend=b)),
    "subm k3x1x5": _plain(lambda b: SubMConv3d(8, 16, (3, 1, 5), backend=b)),
    "down k2 s2": _plain(lambda b: SparseConv3d(8, 16, 2, 2, backend=b)),
    "down k3 s2 p1": _plain(lambda b: SparseConv3d(8, 16, 3, 2, 1, backend=b)),
    "up k2 s2 (all children)": _plain(lambda b: SparseConvTranspose3d(8, 16, 2, 2, backend=b)),
    "up k2 s2 onto target": _onto_target(2, 0),
    "up k3 s2 p1 onto target": _onto_target(3, 1),
}


def run_layer(case: Case, backend: str, state: dict[str, torch.Tensor] | None, coords: torch.Tensor,
              feats: torch.Tensor, shape: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Forward + backward of one case; returns coords, output and the gradients (all on CPU, float64)."""
    torch.manual_seed(0)
    module, apply = case(backend)
    if state is not None:
        module.load_state_dict(state)
    module = module.to(device, dtype)
    f = feats.to(device, dtype).requires_grad_()
    x = SparseTensor(coords.to(device), f, shape, batch_size=2)
    y = apply(module, x)
    upstream = torch.randn(y.feats.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(y.feats, [f, *params.values()], upstream.to(device, dtype))
    out = {"coords": y.coords.cpu(), "out": y.feats.detach().cpu().double(), "grad input": grads[0].cpu().double()}
    out |= {f"grad {name}": g.cpu().double() for name, g in zip(params, grads[1:], strict=True)}
    out["state"] = {k: v.detach().cpu().double() for k, v in module.state_dict().items()}
    return out


def compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[dict[str, float], str | None]:
    """Per-tensor relative error of a against b, or the reason they cannot be compared."""
    if a["coords"].shape != b["coords"].shape or not torch.equal(a["coords"], b["coords"]):
        return {}, f"output coordinates differ ({len(a['coords'])} vs {len(b['coords'])} rows)"
    errs = {}
    for key in b:
        if key in ("coords", "state"):
            continue
        ref = b[key]
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        diff = float((a[key] - ref).abs().max()) if ref.numel() else 0.0
        errs[key] = diff / scale if scale > 0 else diff
    return errs, None


def layer_checks(device: torch.device, spconv_ok: bool) -> list[dict[str, Any]]:
    results = []
    coords, feats, shape = random_grid()
    cpu = torch.device("cpu")
    for name, case in CASES.items():
        ref = run_layer(case, "torch", None, coords, feats, shape, cpu, torch.float64)
        state = ref["state"]
        runs = {
            "torch-f64": (run_layer(case, "torch", state, coords, feats, shape, device, torch.float64), ref),
            "torch-f32": (run_layer(case, "torch", state, coords, feats, shape, device, torch.float32), ref),
        }
        if spconv_ok:
            torch32 = runs["torch-f32"][0]
            runs["spconv-f32"] = (run_layer(case, "spconv", state, coords, feats, shape, device, torch.float32),
                                  torch32)
        for kind, (got, want) in runs.items():
            errs, why = compare(got, want)
            worst = max(errs.values(), default=float("inf"))
            ok = why is None and worst <= TOL[kind]
            results.append({"case": name, "check": kind, "rows": len(got["coords"]), "rel_err": errs,
                            "max_rel_err": worst if why is None else None, "tol": TOL[kind], "pass": ok,
                            "error": why})
    return results


# ---- VAE end to end ---------------------------------------------------------------------------------------
def vae_batch(resolution: int = 32, views: int = 2, cube_size: str | None = None) -> dict[str, Any]:
    from interiorfusion_data.config import DataStageConfig
    from interiorfusion_data.format import decode_sample
    from interiorfusion_data.loader import collate_scenes
    from interiorfusion_data.pipeline import build_sample, procedural_options
    from interiorfusion_data.procedural import generate_scene

    voxel: dict[str, Any] = {"resolutions": [resolution]} | ({"cube_size": cube_size} if cube_size else {})
    cfg = DataStageConfig(seed=0, num_scenes=1, voxel=voxel, render={"views": views, "image_size": 32})
    sample = build_sample(generate_scene(0, 0, procedural_options(cfg)), cfg, 0)
    return collate_scenes([decode_sample(sample.members, resolution, fields=("voxels", "views"), views=views)])


def vae_step(batch: dict[str, Any], backend: str, state: dict[str, torch.Tensor] | None, device: torch.device,
             dtype: torch.dtype, render_views: int = 2) -> dict[str, Any]:
    from interiorfusion_vae.config import VAEPretrainConfig
    from interiorfusion_vae.task import VAETask, build_vae

    config = VAEPretrainConfig(model={"latent_dim": 4, "channels": [8, 8, 16, 16, 16], "blocks_per_level": 1,
                                      "sparse_backend": backend, "target_resolution": 32},
                               loss={"render_views": render_views})
    torch.manual_seed(0)
    model = build_vae(config)
    if state is None:
        # Non-zero last convs (they start at zero) so every weight gets a gradient worth comparing.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("conv2.weight"):
                    p.normal_(0, 0.05)
        model.set_material_prior(batch["feats"].float().mean(0))
    else:
        model.load_state_dict(state)
    model = model.to(device, dtype).eval()  # eval: z = μ, no device-dependent sampling noise
    task = VAETask(config, data_uri="")
    losses = task.compute_losses(model, task.to_device(batch, device, dtype))
    losses["loss"].backward()
    out = {"losses": {k: float(v.detach()) for k, v in losses.items()},
           "grads": {n: p.grad.detach().cpu().double() for n, p in model.named_parameters() if p.grad is not None},
           "state": {k: v.detach().cpu().double() for k, v in model.state_dict().items()}}
    return out


def vae_compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float, str, dict[str, float]]:
    """Largest relative loss error, largest per-parameter gradient error (relative to that gradient's largest
    entry, floored at 1e-3 of the largest gradient anywhere: a conv bias followed by a GroupNorm has a gradient
    that is zero up to rounding), the worst parameter's name, and every parameter's error."""
    loss_err = max(abs(a["losses"][k] - v) / max(abs(v), 1e-12) for k, v in b["losses"].items())
    floor = 1e-3 * max((float(g.abs().max()) for g in b["grads"].values()), default=0.0)
    grad_errs = {}
    for name, ref in b["grads"].items():
        got = a["grads"].get(name)
        if got is None:
            grad_errs[name] = float("inf")
            continue
        scale = max(float(ref.abs().max()), floor, 1e-30)
        grad_errs[name] = float((got - ref).abs().max()) / scale
    missing = set(a["grads"]) ^ set(b["grads"])
    worst = max(grad_errs, key=grad_errs.get) if grad_errs else ""
    return loss_err, (float("inf") if missing else grad_errs.get(worst, 0.0)), worst, grad_errs


def vae_checks(device: torch.device, spconv_ok: bool) -> list[dict[str, Any]]:
    batch = vae_batch()
    cpu = torch.device("cpu")
    ref = vae_step(batch, "torch", None, cpu, torch.float64)
    runs = {"vae-torch-f64": (vae_step(batch, "torch", ref["state"], device, torch.float64), ref)}
    if spconv_ok:
        # Without the render losses: their pixel masks (coverage > 0.5) are discontinuous, and at initialisation
        # many pixels sit near the threshold, so float32 rounding differences between backends could flip them.
        torch32 = vae_step(batch, "torch", ref["state"], device, torch.float32, render_views=0)
        spconv32 = vae_step(batch, "spconv", ref["state"], device, torch.float32, render_views=0)
        runs["vae-spconv-f32"] = (spconv32, torch32)
    results = []
    for kind, (got, want) in runs.items():
        loss_err, grad_err, worst, _ = vae_compare(got, want)
        tol_l, tol_g = VAE_TOL[kind]
        results.append({"case": f"VAE step 32³ ({int(batch['num_voxels'][0])} voxels)", "check": kind,
                        "loss_rel_err": loss_err, "grad_rel_err": grad_err, "worst_grad": worst,
                        "params_with_grad": len(want["grads"]), "losses": got["losses"],
                        "reference_losses": want["losses"], "tol": [tol_l, tol_g],
                        "pass": loss_err <= tol_l and grad_err <= tol_g})
    return results


# ---- VAE bf16 training step and encode job ----------------------------------------------------------------
def _smoke_vae_config(resolution: int) -> Any:
    """configs/smoke/vae.yaml (widths, losses, 2 render views) at one resolution."""
    import yaml

    from interiorfusion_vae.config import VAEPretrainConfig

    cfg = yaml.safe_load((ROOT / "configs/smoke/vae.yaml").read_text())
    cfg["model"] |= {"base_resolution": resolution, "target_resolution": resolution}
    cfg["training"] |= {"curriculum": [], "max_steps": 1}
    return VAEPretrainConfig.model_validate(cfg)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_step_checks(device: torch.device, resolution: int, steps: int) -> list[dict[str, Any]]:
    """Training steps of the smoke VAE in bf16, the two ways the engine runs bf16 (Runtime.autocast and
    input_dtype): `autocast` (plain/DDP: fp32 weights, bf16 autocast) and `deepspeed-bf16` (bf16 weights and input
    features, no autocast; plain AdamW here instead of DeepSpeed's fp32 master weights). Each: the engine's default
    train_step (next batch → to_device → autocast → compute_losses → backward) plus an AdamW step, timed after one
    warm-up step. Passes when every loss and gradient is finite, the render terms are float32, and the first step's
    loss is within 10 % of the fp32 loss at the same weights (bf16 rounding, not a different computation)."""
    from interiorfusion_core.engine import StepContext
    from interiorfusion_core.engine.distributed import Runtime
    from interiorfusion_vae.task import VAETask, build_vae

    config = _smoke_vae_config(resolution)
    cpu_batch = vae_batch(resolution, cube_size="fit")  # the room fills the grid, as in the smoke data
    task = VAETask(config, data_uri="")
    results = []
    for mode in ("autocast", "deepspeed-bf16"):
        deepspeed = mode == "deepspeed-bf16"
        torch.manual_seed(0)
        model = build_vae(config)
        model.set_material_prior(cpu_batch["feats"].float().mean(0))
        model = model.to(device)
        with torch.no_grad():
            torch.manual_seed(1)
            ref = float(task.compute_losses(model, task.to_device(cpu_batch, device))["loss"])
        if deepspeed:
            model = model.to(torch.bfloat16)
        rt = Runtime(accelerator=None, device=device, rank=0, world_size=1, deepspeed=deepspeed,
                     zero_stage=3 if deepspeed else None, precision="bf16")
        step = StepContext(rt, model, model, {}, accumulation=1,
                           next_batch=lambda to_device, rt=rt: task.to_device(cpu_batch, rt.device, rt.input_dtype))
        opt = torch.optim.AdamW(model.parameters(), lr=config.optimizer.lr)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        losses, times, grads_ok, render_fp32 = [], [], True, True
        torch.manual_seed(1)
        for i in range(steps + 1):
            _sync(device)
            t0 = time.perf_counter()
            terms = task.train_step(step)
            grads_ok &= all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if i > 0:  # the first step builds maps and warms the kernels
                times.append(time.perf_counter() - t0)
            losses.append(float(terms["loss"].detach()))
            render_fp32 &= all(terms[k].dtype == torch.float32 for k in ("depth_consistency", "edge_preservation"))
        finite = all(math.isfinite(v) for v in losses)
        rel = abs(losses[0] - ref) / max(abs(ref), 1e-12)
        results.append({"case": f"VAE bf16 step {resolution}³ ({int(cpu_batch['num_voxels'][0])} voxels)",
                        "check": mode, "losses": losses, "fp32_loss": ref, "loss_rel_to_fp32": rel,
                        "step_s": statistics.median(times), "step_times_s": times,
                        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                        else None, "finite_losses": finite, "finite_grads": grads_ok, "render_terms_fp32": render_fp32,
                        "pass": finite and grads_ok and render_fp32 and rel <= 0.1})
    return results


def encode_job_check(device: torch.device, resolution: int, scenes: int, work: Path) -> dict[str, Any]:
    """The stage's encode job (`interiorfusion_vae.latents.encode_dataset`) with the model on the device, on a small
    procedural dataset written without a stage run (shards + a stand-in manifest listing no artifacts, which the
    dataset reader accepts unverified), timed after a warm-up pass. Passes when every split's latents read back
    through `open_latents`, finite, 2·latent_dim channels, one latent set per scene; one sample's latents are
    compared with the same weights encoding on CPU (reported, not gated: the constant first-level input makes
    float32 GroupNorm statistics rounding-sensitive)."""
    from interiorfusion_core.manifest import MANIFEST_KEY, Manifest
    from interiorfusion_core.storage import open_store
    from interiorfusion_data.config import DataStageConfig
    from interiorfusion_data.loader import open_dataset
    from interiorfusion_data.pipeline import write_dataset
    from interiorfusion_vae.latents import encode_dataset, encode_sample, open_latents
    from interiorfusion_vae.task import build_vae

    for sub in ("data-work", "encode-work"):
        (work / sub).mkdir()
    data = open_store(str(work / "data"))
    cfg = DataStageConfig(seed=0, num_scenes=scenes, voxel={"resolutions": [resolution], "cube_size": "fit"},
                          render={"views": 1, "image_size": 16}, preview_samples=0)
    t0 = time.perf_counter()
    write_dataset(data, cfg, work / "data-work")
    data.put_json(MANIFEST_KEY, Manifest(stage="data", cache_key="gpu-check", config_kind="data", config_digest="",
                                         config={}).model_dump(mode="json"))
    data_s = time.perf_counter() - t0
    config = _smoke_vae_config(resolution)
    torch.manual_seed(0)
    model = build_vae(config).eval()
    cpu_model = build_vae(config).eval()
    cpu_model.load_state_dict(model.state_dict())
    model = model.to(device)
    out = open_store(str(work / "vae"))
    encode_dataset(out, model, data.uri, config, work_dir=work / "encode-work", device=device)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    result = encode_dataset(out, model, data.uri, config, work_dir=work / "encode-work", device=device)
    _sync(device)
    seconds = time.perf_counter() - t0
    samples, rows, ok = 0, 0, True
    for split in dict.fromkeys(config.encode.splits):
        latents = open_latents(out, split, resolution, normalized=False, require_manifest=False)
        for k in range(len(latents)):
            feats = latents[k]["feats"]
            ok &= feats.shape[1] == 2 * config.model.latent_dim and bool(torch.isfinite(feats).all())
            rows += len(feats)
        samples += len(latents)
    ok &= samples == scenes and rows > 0
    first = open_dataset(data.uri, "train").get(0, resolution, fields=("voxels",))
    with torch.no_grad():
        on_cpu = encode_sample(cpu_model, first).feats
        on_dev = encode_sample(model, first).feats.cpu()
    rel = float((on_dev - on_cpu).abs().max() / on_cpu.abs().max().clamp_min(1e-30))
    return {"case": f"VAE encode job {resolution}³ ({samples} samples, {rows} latent rows)", "check": "encode",
            "seconds": seconds, "s_per_sample": seconds / max(samples, 1), "data_s": data_s,
            "job_metrics": result.metrics, "device_vs_cpu_rel": rel, "pass": bool(ok)}


# ---- structure DiT: bf16 step under ZeRO-3, MFU -------------------------------------------------------------
# (width, depth, heads, mlp hidden, condition width, condition tokens per sample)
DIT_SIZES = {"seed": (1536, 30, 12, 8192, 1024, 2113), "tiny": (64, 2, 4, 128, 32, 16)}
# Dense bf16 tensor-core peaks by device-name fragment (TFLOPs); bench/gpu_check.py reports MFU against these.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.2}


def peak_bf16_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _deepspeed_zero3(model: torch.nn.Module, lr: float) -> Any:
    """One-process DeepSpeed engine: ZeRO-3, bf16, torch's AdamW (DeepSpeed's fused Adam would need nvcc)."""
    import os
    import socket

    import deepspeed

    if not torch.distributed.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                           "LOCAL_RANK": "0"})
        deepspeed.init_distributed(dist_backend="nccl")
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "bf16": {"enabled": True}, "zero_optimization": {"stage": 3},
              "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.01, "torch_adam": True}},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def dit_step_check(device: torch.device, size: str, samples: int, tokens: int, steps: int,
                   warmup: int) -> dict[str, Any]:
    """The latent DiT's bf16 training step on packed sequences: ZeRO-3 on CUDA (when DeepSpeed imports), bf16
    weights + AdamW elsewhere; time per step after the warm-up, MFU from planning.py's FLOP terms."""
    from interiorfusion_structure.attention import Segments
    from interiorfusion_structure.dit import DiT, count_parameters
    from interiorfusion_structure.planning import dit_forward_flops

    width, depth, heads, mlp, cond_width, cond_tokens = DIT_SIZES[size]
    channels, grid = 64, 64
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: 1.34B parameters initialise in seconds on a GPU
        net = DiT(channels, channels, width=width, depth=depth, heads=heads, mlp_hidden=mlp, cond_width=cond_width)
    params = count_parameters(net)
    mode, why = "deepspeed-zero3", None
    losses: list[float] = []
    times: list[float] = []
    grads_ok = True
    if device.type != "cuda":
        mode, why = "bf16-standin", "CPU: DeepSpeed ZeRO-3 needs CUDA (bf16 weights + torch AdamW instead)"
    else:
        try:
            import deepspeed  # noqa: F401
        except Exception as exc:
            mode, why = "bf16-standin", f"deepspeed not importable ({type(exc).__name__}: {exc})"
    if mode == "deepspeed-zero3":
        engine = _deepspeed_zero3(net, 1e-4)
        forward, backward = engine, engine.backward
        opt = None

        def step() -> None:
            nonlocal grads_ok
            engine.step()
            norm = engine.get_global_grad_norm()  # ZeRO-3 partitions the gradients: their norm is the check
            grads_ok &= norm is not None and math.isfinite(float(norm))
    else:
        net = net.to(device, torch.bfloat16)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.01)
        forward, backward = net, lambda loss: loss.backward()

        def step() -> None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(0)
    cells = torch.cat([torch.randperm(grid**3, generator=g)[:tokens] for _ in range(samples)])
    coords = torch.stack([torch.arange(samples).repeat_interleave(tokens), cells // grid**2, cells // grid % grid,
                          cells % grid], 1).to(device)
    bf16 = {"device": device, "dtype": torch.bfloat16}
    x1 = torch.randn(samples * tokens, channels, generator=g).to(**bf16)
    cond = torch.randn(samples * cond_tokens, cond_width, generator=g).to(**bf16)
    pooled = torch.randn(samples, cond_width, generator=g).to(**bf16)
    segs = Segments.from_lengths([tokens] * samples).to(device)
    csegs = Segments.from_lengths([cond_tokens] * samples).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        t = torch.rand(samples, generator=g).to(device)
        x0 = torch.randn(x1.shape, generator=g).to(**bf16)
        tt = t.repeat_interleave(tokens)[:, None].to(torch.bfloat16)
        xt = tt * x1 + (1 - tt) * x0  # rectified flow: t = 1 is data
        _sync(device)
        t0 = time.perf_counter()
        v = forward(xt, coords, segs, t, cond, csegs, pooled)  # t float32: its embedding needs the bits
        loss = (v.float() - (x1 - x0).float()).square().mean()
        backward(loss)
        if opt is not None:
            grads_ok &= all(bool(torch.isfinite(p.grad).all()) for p in net.parameters() if p.grad is not None)
        step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    f = dit_forward_flops(tokens, width, depth, mlp, cond_tokens)
    step_flops = 3 * samples * sum(f.values())
    step_s = statistics.median(times)
    peak = peak_bf16_tflops(device)
    achieved = step_flops / step_s
    mfu = achieved / (peak * 1e12) if peak else None
    finite = all(math.isfinite(v) for v in losses)
    if mode == "deepspeed-zero3":
        torch.distributed.barrier()
    return {"case": f"DiT W{width} D{depth} H{heads} MLP{mlp}, {samples}×{tokens} tokens", "check": "dit",
            "mode": mode, "why": why, "params": params, "losses": losses, "step_s": step_s, "step_times_s": times,
            "step_tflop": step_flops / 1e12, "flop_terms_fwd_per_sample": f, "achieved_tflops": achieved / 1e12,
            "peak_bf16_tflops": peak, "mfu": mfu, "mfu_target": 0.45,
            "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "finite_losses": finite, "finite_grads": grads_ok, "pass": finite and grads_ok}


# ---- main -------------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                           "device": str(device), "backends": backend_status()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {"device_name": props.name, "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1), "cudnn": torch.backends.cudnn.version()}
    for mod in ("spconv", "cumm"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as exc:  # missing or broken: recorded, the checks that need it are skipped
            env[mod] = f"not importable ({type(exc).__name__}: {exc})"
    return env


def print_parity(results: list[dict[str, Any]]) -> None:
    print(f"\n{'case':<28}{'check':<16}{'max rel err':>18}{'tol':>14}  result")
    print("-" * 84)
    for r in results:
        if "loss_rel_err" in r:
            err = f"{r['loss_rel_err']:.1e}/{r['grad_rel_err']:.1e}"
            tol = f"{r['tol'][0]:.0e}/{r['tol'][1]:.0e}"
        else:
            err = f"{r['max_rel_err']:.1e}" if r["max_rel_err"] is not None else "n/a"
            tol = f"{r['tol']:.0e}"
        line = f"{r['case']:<28}{r['check']:<16}{err:>18}{tol:>14}  {'PASS' if r['pass'] else 'FAIL'}"
        if r.get("error"):
            line += f" ({r['error']})"
        elif not r["pass"] and "worst_grad" in r:
            line += f" (worst gradient: {r['worst_grad']})"
        print(line)
    print("(VAE rows: loss / gradient relative error)")


def print_training(results: list[dict[str, Any]]) -> None:
    print(f"\n{'case':<50}{'check':<16}{'result':>44}")
    print("-" * 116)
    for r in results:
        if r["check"] == "dit":
            what = (f"{r['mode']}: {r['step_s'] * 1e3:.0f} ms/step, {r['achieved_tflops']:.3g} TFLOP/s"
                    + (f", MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""))
        elif r["check"] == "encode":
            what = (f"{r['s_per_sample'] * 1e3:.1f} ms/sample, vs CPU {r['device_vs_cpu_rel']:.1e}")
        else:
            what = (f"loss {r['losses'][0]:.4f} (fp32 {r['fp32_loss']:.4f}), {r['step_s'] * 1e3:.0f} ms/step"
                    + (f", {r['peak_mem_gb']:.2f} GiB" if r["peak_mem_gb"] is not None else ""))
        print(f"{r['case']:<50}{r['check']:<16}{what:>44}  {'PASS' if r['pass'] else 'FAIL'}")


CHECKS = ("parity", "bf16", "encode", "dit")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu (auto: cuda if available)")
    ap.add_argument("--checks", default=",".join(CHECKS),
                    help="comma-separated, any of: parity (sparse convs and the VAE step against references), bf16 "
                         "(the VAE's bf16 training step, both engine modes, timed), encode (the encode job, timed), "
                         "dit (the structure DiT's bf16 ZeRO-3 step, MFU); default all")
    ap.add_argument("--no-vae", action="store_true", help="parity: layer cases only")
    ap.add_argument("--resolution", type=int, help="bf16/encode grid (default 128 on CUDA, 32 on CPU)")
    ap.add_argument("--steps", type=int, help="bf16 / dit: timed steps (per mode; default 10 on CUDA, 2 on CPU)")
    ap.add_argument("--encode-scenes", type=int, default=4, help="encode: procedural scenes to encode (default 4)")
    ap.add_argument("--dit-size", choices=sorted(DIT_SIZES), help="dit: seed (default on CUDA) or tiny (on CPU)")
    ap.add_argument("--dit-samples", type=int, help="dit: packed samples (default 2; 2 on CPU)")
    ap.add_argument("--dit-tokens", type=int, help="dit: latent tokens per sample (default 8192; 64 on CPU)")
    ap.add_argument("--dit-warmup", type=int, default=2, help="dit: untimed steps first (default 2)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads for the CPU references (default 1: the grids are tiny, and more threads "
                         "only contend on a shared machine)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown or not checks:
        ap.error(f"--checks: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(CHECKS)}")

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"FAIL: --device {args.device} but torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA "
              "device; use --device cpu to run the checks on CPU", file=sys.stderr)
        return 2
    # float32 must mean float32 on Ampere and later: no TF32 in matmuls or convolutions.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    resolution = args.resolution or (128 if device.type == "cuda" else 32)
    steps = args.steps or (10 if device.type == "cuda" else 2)
    t0 = time.perf_counter()
    env = environment(device)
    spconv_why = env["backends"]["spconv"]
    print(f"torch {env['torch']} (CUDA {env['torch_cuda']}) on {device}"
          + (f": {env['device_name']} (sm {env['capability']}, {env['memory_gib']} GiB)" if "device_name" in env
             else ""))
    print(f"spconv {env['spconv']}; cumm {env['cumm']}")
    if spconv_why is not None and "parity" in checks:
        print(f"SKIP spconv checks: the spconv backend is not usable here ({spconv_why})")

    results: list[dict[str, Any]] = []
    if "parity" in checks:
        parity = layer_checks(device, spconv_why is None)
        if not args.no_vae:
            parity += vae_checks(device, spconv_why is None)
        print_parity(parity)
        results += parity
    training: list[dict[str, Any]] = []
    if "bf16" in checks:
        training += bf16_step_checks(device, resolution, steps)
    if "encode" in checks:
        try:
            import safetensors  # noqa: F401  (the encode job writes safetensors shards)
        except ImportError as exc:
            print(f"SKIP encode job: safetensors is not importable here ({exc}); put its wheel in gpu-check-wheels/")
        else:
            with tempfile.TemporaryDirectory(prefix="gpu-check-encode-") as work:
                training.append(encode_job_check(device, resolution, args.encode_scenes, Path(work)))
    if "dit" in checks:
        cuda = device.type == "cuda"
        training.append(dit_step_check(device, args.dit_size or ("seed" if cuda else "tiny"), args.dit_samples or 2,
                                       args.dit_tokens or (8192 if cuda else 64), args.steps or (10 if cuda else 2),
                                       args.dit_warmup))
    if training:
        print_training(training)
        results += training
    failed = [r for r in results if not r["pass"]]
    total = time.perf_counter() - t0
    verdict = "PASS" if not failed else f"FAIL ({len(failed)} of {len(results)} checks)"
    print(f"\n{'+'.join(checks)} on {device}: {verdict} in {total:.1f}s"
          + ("" if spconv_why is None or "parity" not in checks else "; spconv checks skipped"))
    if args.json:
        headline: dict[str, Any] = {"pass": not failed, "checks": len(results), "failed": len(failed),
                                    "device": device.type}
        rows = []
        if "parity" in checks:
            headline["spconv_checked"] = spconv_why is None
            what = "sparse conv + VAE" if not args.no_vae else "sparse conv"
            n = sum(1 for r in results if r in parity)
            rows.append(row(f"{what} parity checks passed on {device.type}"
                            + ("" if spconv_why is None else " (no spconv)"),
                            n - sum(1 for r in failed if r in parity), "", "checks run", n, target="all"))
        for r in training:
            if r["check"] == "dit":
                headline |= {"dit_step_s": r["step_s"], "dit_mfu": r["mfu"], "dit_mode": r["mode"]}
                where = device.type if r["peak_bf16_tflops"] is None else torch.cuda.get_device_name(device)
                if r["mfu"] is not None:
                    rows.append(row(f"structure DiT bf16 step ({r['mode']}), {r['case']}, {where}: MFU",
                                    100 * r["mfu"], "%", f"dense bf16 peak {r['peak_bf16_tflops']:g} TFLOPs",
                                    target="≥ 45 %", ratio=None))
                rows.append(row(f"structure DiT bf16 step ({r['mode']}), {r['case']}, {where}", r["step_s"],
                                "s/step"))
            elif r["check"] == "encode":
                headline["encode_s_per_sample"] = r["s_per_sample"]
                rows.append(row(f"VAE encode job on {device.type}, {resolution}³", r["s_per_sample"], "s/sample"))
            else:
                key = "bf16_autocast_step_s" if r["check"] == "autocast" else "bf16_deepspeed_step_s"
                headline[key] = r["step_s"]
                headline[key.replace("step_s", "loss")] = r["losses"][0]
                rows.append(row(f"VAE bf16 step ({r['check']}) on {device.type}, {resolution}³", r["step_s"],
                                "s/step"))
        write_json(args.json, "gpu_check", rows, {"environment": env, "results": results, "total_s": total,
                                                   "checks": checks}, headline=headline)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
