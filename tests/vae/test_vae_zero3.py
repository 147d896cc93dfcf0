"""The VAE under DeepSpeed ZeRO-3: the sparse layers that own weights show module hooks plain tensors only, and
the smoke VAE trained by 2 CPU processes under configs/accelerate_deepspeed.yaml (ZeRO-3, zero.Init, gloo) matches
one process on the same global batch, losses and final weights.

    python tests/vae/test_vae_zero3.py CONFIG.yaml DATA_URI OUTPUT RECORD.json

is the program the distributed test launches (plain `python` for the reference, `accelerate launch` for ZeRO-3):
the real VAE stage through the stage contract, with rank 0 writing every logged train row and what ZeRO-3 did to
the parameters to RECORD.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "tests" / "engine") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests" / "engine"))  # the engine tests' launch helpers

STEPS = 6
LR = 2.0e-3  # configs/smoke/vae.yaml
# fp32 on both sides; what differs is only the order of the gradient sums (2 ranks averaged vs 2 micro-batches
# accumulated) and DeepSpeed's flattened partitions. Measured: losses 1e-7 relative, weights 5e-6 absolute (training
# moved them by ~4e-3), except the parameters `_gradient_free` finds.
LOSS_RTOL = 1e-4
WEIGHT_RTOL, WEIGHT_ATOL = 1e-3, 1e-5


def test_parametrised_sparse_layers_see_plain_tensors() -> None:
    """What ZeRO-3 relies on: every module holding parameters gets and returns plain tensors at
    `nn.Module.__call__` (where DeepSpeed attaches the hooks that re-gather weights for backward), so the
    gradients flow through those hooks."""
    from interiorfusion_core.sparse import SparseTensor
    from interiorfusion_vae.model import SLATInteriorVAE

    torch.manual_seed(0)
    model = SLATInteriorVAE(latent_dim=4, channels=[8, 8, 16, 16, 16], blocks_per_level=1, backend="torch")
    seen: dict[str, tuple[list[type], type]] = {}
    hooked: set[str] = set()

    def watch(name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
            seen[name] = ([type(i) for i in inputs], type(output))
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda g: hooked.add(name))  # as ZeRO-3's pre-backward hook does
            return output

        return hook

    owners = {name: m for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    for name, module in owners.items():
        module.register_forward_hook(watch(name))
    g = torch.zeros(32, 32, 32, dtype=torch.bool)
    g[2:30, 2:30, 2] = g[2, 2:30, 2:30] = g[2:30, 2, 2:30] = True
    occ = SparseTensor.from_occupancy(g[None])
    enc, out = model(occ, torch.rand(len(occ), 8))
    heads = sum(logits.sum() for logits in out.child_logits)
    (heads + out.material.sum() + enc["mu"].feats.sum() + enc["logvar"].feats.sum()).backward()

    assert len(seen) >= 0.9 * len(owners), sorted(set(owners) - set(seen))  # (a head may be switched off)
    bad = {n: s for n, s in seen.items() if s[1] is not torch.Tensor or any(t is not torch.Tensor for t in s[0])}
    assert not bad, f"modules with parameters whose inputs/outputs are not plain tensors: {bad}"
    # The backward went through their outputs: every encoder layer (all on the loss's path through μ and log σ²)
    # and the decoder's layers that feed a loss.
    encoders = {n for n in seen if n.startswith(("geometry_encoder.", "material_encoder."))}
    assert encoders and encoders <= hooked, sorted(encoders - hooked)
    assert any(n.startswith("decoder.") for n in hooked)


def _write_vae_config(path: Path, batch_size: int, accumulation: int, num_gpus: int) -> Path:
    """The smoke VAE (configs/smoke/vae.yaml widths: its 64-channel convs exceed ZeRO-3's parameter persistence
    threshold, so they really are partitioned) at 32³ for STEPS steps."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs/smoke/vae.yaml").read_text())
    cfg["model"] |= {"base_resolution": 32, "target_resolution": 32}
    cfg["training"] |= {"batch_size": batch_size, "gradient_accumulation": accumulation, "num_gpus": num_gpus,
                        "max_steps": STEPS, "curriculum": [], "log_every": 1, "val_every": 1000,
                        "checkpoint_every": 1000, "keep_last_checkpoints": 1, "grad_clip": 1.0}
    cfg["scheduler"] = {"type": "cosine_with_restarts", "warmup_steps": 2}
    cfg["encode"] = {"eval_split": "val", "eval_samples": 1, "samples_per_shard": 64}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Six 32³ procedural rooms (4 train, 1 val, 1 test), 2 views of 32 px."""
    import yaml

    import interiorfusion_core.contract as contract
    from interiorfusion_core.contract import run_stage
    from interiorfusion_core.tracking import NullTracker

    root = tmp_path_factory.mktemp("vae-zero3-data")
    cfg = yaml.safe_load((ROOT / "configs/smoke/data.yaml").read_text())
    cfg |= {"num_scenes": 6, "voxel": {"resolutions": [32], "cube_size": "fit"},
            "render": {"views": 2, "image_size": 32}, "preview_samples": 0}
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(contract, "Tracker", NullTracker)  # MLflow's SQLite set-up is not what this test is about
        return run_stage("data", path, output=(root / "data").as_uri()).uri


def _final_model(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    manifest = json.loads((out / "manifest.json").read_text())
    return load_file(out / manifest["outputs"]["checkpoint"] / "model.safetensors")


def _gradient_free(config: Path, data_uri: str, state: dict[str, torch.Tensor]) -> set[str]:
    """Parameters whose gradient is zero in exact arithmetic: biases whose only consumer is a GroupNorm with one
    channel per group, which removes any per-channel constant. In float32 their gradient is rounding noise that
    depends on the summation order, and Adam turns noise into steps of about lr, so 1 and 2 processes legitimately
    disagree on them by up to ~lr per step. Found from a float64 gradient at the trained weights (every residual
    branch non-zero), not listed by name, so a change of the model keeps the test honest."""
    from interiorfusion_core.config import load_config
    from interiorfusion_data.loader import collate_scenes, open_dataset
    from interiorfusion_vae.task import VAETask, build_vae

    cfg = load_config(config).model
    task = VAETask(cfg, data_uri)
    model = build_vae(cfg)
    model.load_state_dict(state)
    model = model.double()
    data = open_dataset(data_uri, "train")
    batch = collate_scenes([data.get(i, 32, ("voxels", "views"), 2) for i in range(2)])
    task.compute_losses(model, task.to_device(batch, torch.device("cpu"), torch.float64))["loss"].backward()
    grads = {n: float(p.grad.abs().max()) if p.grad is not None else 0.0 for n, p in model.named_parameters()}
    top = max(grads.values())
    return {n for n, g in grads.items() if g <= 1e-9 * top}


def _losses(record: dict[str, Any]) -> dict[int, float]:
    return {int(r["step"]): r["train/loss"] for r in record["rows"] if "train/loss" in r}


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_two_processes_match_one(tiny_data: str, tmp_path: Path) -> None:
    import subprocess

    from test_engine_program import child_env, launch_2_processes

    quiet = {"PYTHONWARNINGS": "ignore::FutureWarning,ignore::UserWarning", "HF_HOME": str(tmp_path / "hf")}
    program = str(Path(__file__).resolve())

    def run(cmd: list[str], name: str, env: dict[str, str]) -> tuple[dict[str, Any], Path, float]:
        out, record = tmp_path / name, tmp_path / f"{name}.json"
        t0 = time.perf_counter()
        proc = subprocess.run([*cmd, program, str(config[name]), tiny_data, str(out), str(record)],
                              env=child_env(tmp_path, **quiet, **env), cwd=ROOT, capture_output=True, text=True,
                              timeout=420)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return json.loads(record.read_text()), out, time.perf_counter() - t0

    # The same global batch of 2: one process accumulating two micro-batches of 1, or 2 ranks with 1 each (the
    # loader gives rank r every 2nd sample of the epoch's order, the single process all of them in that order).
    config = {"single": _write_vae_config(tmp_path / "single.yaml", 1, 2, 1),
              "zero3": _write_vae_config(tmp_path / "zero3.yaml", 1, 1, 2)}
    single, single_out, t_single = run([sys.executable], "single", {})
    env: dict[str, str] = {}
    launcher = launch_2_processes("zero3", env)
    zero3, zero3_out, t_zero3 = run(launcher, "zero3", env)

    assert single["mode"] == {"deepspeed": False, "world_size": 1, "zero_stage": None}
    assert zero3["mode"] == {"deepspeed": True, "world_size": 2, "zero_stage": 3}
    assert zero3["zero3_init"], "configs/accelerate_deepspeed.yaml sets zero3_init_flag: the build runs in zero.Init"
    # ZeRO-3 really partitions weights between uses here (the rest are below its persistence threshold).
    assert zero3["partitioned_params"] > 0, zero3

    expected, got = _losses(single), _losses(zero3)
    assert sorted(expected) == sorted(got) == list(range(1, STEPS + 1))
    worst = max(abs(got[s] - v) / abs(v) for s, v in expected.items())
    print(f"\n1 process {t_single:.0f} s, ZeRO-3 2 processes {t_zero3:.0f} s; loss max rel diff {worst:.2e}")
    for step, value in expected.items():
        assert got[step] == pytest.approx(value, rel=LOSS_RTOL), f"step {step}: {got[step]} vs {value}"

    a, b = _final_model(zero3_out), _final_model(single_out)
    prior = next(k for k in b if k.endswith("material_prior"))
    assert a.keys() == b.keys()
    free = _gradient_free(config["single"], tiny_data, b)
    assert free and all(n.endswith(".bias") for n in free), free
    diffs = {k: float((a[k] - b[k]).abs().max()) for k in b}
    trained = {k: d for k, d in diffs.items() if k not in free}
    print(f"final weights: max abs diff {max(trained.values()):.2e} ({max(trained, key=trained.get)}); "
          f"{len(free)} gradient-free biases up to {max(diffs[k] for k in free):.2e}")
    for k in b:
        if k in free:
            assert diffs[k] <= LR * STEPS, k  # Adam moves a parameter by about lr per step at most
        else:
            torch.testing.assert_close(a[k], b[k], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL,
                                       msg=lambda m, k=k: f"{k}: {m}")
    # The buffer set after the build (set_material_prior, under zero.Init on the ZeRO-3 side) reached the checkpoint.
    torch.testing.assert_close(a[prior], b[prior], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- the program
def main(argv: list[str]) -> int:
    from test_engine_program import recording_trainer

    import interiorfusion_core.contract as contract
    from interiorfusion_core.cli import run_stage_command
    from interiorfusion_core.tracking import NullTracker
    from interiorfusion_vae import stage as vae_stage
    from interiorfusion_vae.model import SLATInteriorVAE

    config, data_uri, output, record_path = argv
    contract.Tracker = NullTracker  # MLflow's SQLite set-up costs seconds per process
    # Decode μ: the reparameterisation noise comes from each rank's own RNG stream, so 2 ranks and one process
    # would draw different noise for the same sample. Everything else is the stage as it runs.
    SLATInteriorVAE.sample = staticmethod(lambda mu, logvar, generator=None: mu)  # type: ignore[method-assign]

    vae_stage.Trainer = recording_trainer(record_path)  # type: ignore[misc]
    run_stage_command("vae", Path(config), None, [f"data={data_uri}"], output, False, False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
