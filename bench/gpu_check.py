"""Sparse-conv and VAE parity on a device (CUDA by default): the numbers a GPU machine must reproduce before its
timings mean anything.

    python bench/gpu_check.py [--device auto|cuda|cpu] [--json parity.json]

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
spconv cases are skipped, with the reason, when spconv does not import. Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _src in (*(str(ROOT / "stages" / p / "src") for p in ("core", "data", "vae")), str(ROOT)):
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
def vae_batch(resolution: int = 32, views: int = 2) -> dict[str, Any]:
    from interiorfusion_data.config import DataStageConfig
    from interiorfusion_data.format import decode_sample
    from interiorfusion_data.loader import collate_scenes
    from interiorfusion_data.pipeline import build_sample, procedural_options
    from interiorfusion_data.procedural import generate_scene

    cfg = DataStageConfig(seed=0, num_scenes=1, voxel={"resolutions": [resolution]},
                          render={"views": views, "image_size": 32})
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu (auto: cuda if available)")
    ap.add_argument("--no-vae", action="store_true", help="layer cases only")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads for the CPU references (default 1: the grids are tiny, and more threads "
                         "only contend on a shared machine)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

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
    t0 = time.perf_counter()
    env = environment(device)
    spconv_why = env["backends"]["spconv"]
    print(f"torch {env['torch']} (CUDA {env['torch_cuda']}) on {device}"
          + (f": {env['device_name']} (sm {env['capability']}, {env['memory_gib']} GiB)" if "device_name" in env
             else ""))
    print(f"spconv {env['spconv']}; cumm {env['cumm']}")
    if spconv_why is not None:
        print(f"SKIP spconv checks: the spconv backend is not usable here ({spconv_why})")

    results = layer_checks(device, spconv_why is None)
    if not args.no_vae:
        results += vae_checks(device, spconv_why is None)

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
    failed = [r for r in results if not r["pass"]]
    print("(VAE rows: loss / gradient relative error)")
    total = time.perf_counter() - t0
    verdict = "PASS" if not failed else f"FAIL ({len(failed)} of {len(results)} checks)"
    print(f"\nparity on {device}: {verdict} in {total:.1f}s"
          + ("" if spconv_why is None else "; spconv checks skipped"))
    if args.json:
        headline = {"pass": not failed, "checks": len(results), "failed": len(failed),
                    "spconv_checked": spconv_why is None, "device": device.type}
        what = "sparse conv + VAE" if not args.no_vae else "sparse conv"
        rows = [row(f"{what} parity checks passed on {device.type}" + ("" if spconv_why is None else " (no spconv)"),
                    len(results) - len(failed), "", "checks run", len(results), target="all")]
        write_json(args.json, "gpu_check", rows, {"environment": env, "results": results, "total_s": total},
                   headline=headline)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
