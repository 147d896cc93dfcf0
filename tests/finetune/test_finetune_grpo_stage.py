"""The smoke GRPO stage end to end on the smoke Structure DiT: the KL to the reference is zero at the first
iteration and stays bounded, against the same iterations at lr ≈ 0 (same seed, so the same rollouts until the
policy moves), the outputs are peft adapters and merged weights that generate loads,
ZeRO-3 full-model GRPO is refused in one sentence, and a run killed with SIGKILL mid-iteration and rerun ends with
the uninterrupted run's adapters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from testservers import REPO

from interiorfusion_core.contract import RunOutcome, run_stage
from interiorfusion_core.manifest import read_manifest
from interiorfusion_structure.generate import load_generator

pytestmark = pytest.mark.slow
CONFIG = REPO / "configs/smoke/grpo.yaml"


def _path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


@pytest.fixture(scope="module")
def grpo_pair(grpo_smoke: RunOutcome, structure_smoke: RunOutcome, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[RunOutcome, RunOutcome]:
    """(the smoke GRPO run, the same run at lr 1e-12: the config refuses 0, and Adam moves each weight by about
    lr per step, so the policy stays its reference and the rollouts are the untrained policy's)."""
    root = tmp_path_factory.mktemp("grpo-lr0")
    frozen = run_stage("grpo", CONFIG, inputs={"structure": structure_smoke.uri}, output=(root / "grpo").as_uri(),
                       overrides=["training.lr=1e-12"])
    return grpo_smoke, frozen


def test_kl_starts_at_zero_and_stays_bounded_against_the_same_iterations_at_lr_zero(
        grpo_pair: tuple[RunOutcome, RunOutcome]) -> None:
    """Paired runs: the same seed gives the same first rollouts; the tuned policy leaves its reference (KL > 0)
    but stays near it, the lr ≈ 0 one never leaves it. (Whether the smoke reward rises is printed, not asserted:
    on the smoke model it is within the rollouts' noise; test_finetune_sde checks the objective raises a reward.)"""
    tuned, frozen = grpo_pair
    a, b = tuned.manifest.metrics, frozen.manifest.metrics
    print(f"\nGRPO smoke: mean reward {a['reward_mean']:.4f} vs lr 0 {b['reward_mean']:.4f}; last-half "
          f"{a['reward_last_half']:.4f} vs {b['reward_last_half']:.4f}; held-out (ODE) {a['heldout_reward']:.4f} vs "
          f"base {a['heldout_base_reward']:.4f}; training prompts (ODE) {a['train_reward']:.4f} vs base "
          f"{a['train_base_reward']:.4f}; the truth's latents through the VAE: held-out "
          f"{a['heldout_truth_reward']:.4f}, training prompts {a['train_truth_reward']:.4f}; KL max {a['kl_max']:.2e}")
    assert a["reward_first"] == b["reward_first"]  # the same rollouts until the policy moves
    assert a["kl_first"] == 0.0  # fresh adapters: the policy is its reference
    assert 0.0 < a["kl_max"] < 1.0  # bounded (nats per dimension)
    assert b["kl_max"] < 1e-12  # lr ≈ 0: the policy never leaves its reference
    assert a["iterations_recorded"] == b["iterations_recorded"] == 10
    # Every third iteration samples the smoke data's edit pairs and scores edit_quality, in both runs alike.
    assert a["edit_iterations"] == b["edit_iterations"] == 3
    assert 0.0 <= a["edit_quality_mean"] <= 1.0
    assert b["heldout_reward"] == pytest.approx(b["heldout_base_reward"], abs=1e-6)
    # The training prompts' ODE reward: the base scores them alike in both runs; at lr ≈ 0 tuned is the base.
    assert a["train_base_reward"] == pytest.approx(b["train_base_reward"], abs=1e-6)
    assert b["train_reward"] == pytest.approx(b["train_base_reward"], abs=1e-6)
    # The ceiling is the conditions' own latents: no policy's, so both runs score it alike.
    for key in ("heldout_truth_reward", "train_truth_reward"):
        assert a[key] == b[key] and 0.0 <= a[key] <= 1.0


def _cell_count_reward(sign: float) -> Any:
    """RewardModel.batch that scores a rollout by ±its number of occupied latent cells: a reward only the occupancy
    policy decides and GRPO can move in a few iterations (the geometric rewards are far noisier at smoke size)."""
    from interiorfusion_finetune.rewards import RewardResult

    def batch(self: Any, scenes: Any, batch: Any, edits: Any = None) -> list[Any]:
        return [RewardResult(sign * float(len(s.cells)), {}) for s in scenes]
    return batch


def test_grpo_moves_the_policy_along_the_reward_against_lr_zero(structure_smoke: RunOutcome, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole GRPO path on the smoke Structure DiT learns (SDE rollouts of both flows, group advantages, the
    clipped objective, LoRA on both flows, the engine's update): rewarded for more occupied cells, its rollouts have
    more than the same iterations at lr ≈ 0; rewarded for fewer, fewer. Same seed, so the same prompts and noise in
    all three runs; the first iteration is the same policy in each."""
    from interiorfusion_finetune.rewards import RewardModel

    def cells(name: str, sign: float, lr: str) -> np.ndarray:
        monkeypatch.setattr(RewardModel, "batch", _cell_count_reward(sign))
        out = tmp_path / name
        run_stage("grpo", CONFIG, inputs={"structure": structure_smoke.uri}, output=out.as_uri(),
                  overrides=["training.num_iterations=8", "rl.edit_every=0", "eval.samples=0", "eval.train_samples=0",
                             "rl.log_renders_every=0", f"training.lr={lr}"])
        curve = json.loads((out / "curve.json").read_text())["iterations"]
        return np.array([sign * r["reward"] for r in curve])  # mean occupied cells per rollout, per iteration

    more, frozen, fewer = cells("more", 1.0, "3e-3"), cells("frozen", 1.0, "1e-12"), cells("fewer", -1.0, "3e-3")
    print(f"\nGRPO on cell count: iterations 4-7 mean cells more {more[4:].mean():.2f}, lr 0 {frozen[4:].mean():.2f}, "
          f"fewer {fewer[4:].mean():.2f}; per iteration more {more.round(1).tolist()} lr 0 {frozen.round(1).tolist()} "
          f"fewer {fewer.round(1).tolist()}")
    assert more[0] == frozen[0] == fewer[0]
    assert more[4:].mean() > frozen[4:].mean() > fewer[4:].mean()


def test_outputs_are_adapters_and_merged_weights_that_generate_loads(grpo_smoke: RunOutcome,
                                                                     structure_smoke: RunOutcome) -> None:
    out = _path(grpo_smoke.uri)
    manifest = read_manifest(grpo_smoke.uri)
    assert {"adapters/structure/adapter_model.safetensors", "merged/structure.safetensors", "eval.json"} <= set(
        manifest.artifacts)
    adapters = load_file(out / "adapters/structure/adapter_model.safetensors")
    # The policy is both flows (rl.policy_flows' default): adapters on both, and nowhere else.
    assert {k.split(".")[2] for k in adapters} == {"latent", "occupancy"}, sorted(adapters)[:4]
    gen = load_generator(grpo_smoke.uri)
    merged = load_file(out / "merged/structure.safetensors")
    assert all(torch.equal(gen.model.state_dict()[k], v) for k, v in merged.items())
    base = load_generator(structure_smoke.uri).model.state_dict()
    changed = {k for k, v in merged.items() if not torch.equal(v, base[k])}
    assert changed and {k.split(".")[0] for k in changed} == {"latent", "occupancy"}
    curve = json.loads((out / "curve.json").read_text())["iterations"]
    assert [r["step"] for r in curve if "reward_edit_quality" in r] == [3, 6, 9]
    assert all(r["edit_iteration"] == (r["step"] % 3 == 0) for r in curve)
    report = json.loads((out / "eval.json").read_text())
    assert report["samples"] >= 1 and np.isfinite(report["metrics"]["reward"])
    assert np.isfinite(report["metrics"]["base_reward"])


def test_full_model_grpo_under_zero3_is_refused(structure_smoke: RunOutcome, tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "tests" / "engine"))
    from test_engine_program import child_env, launch_2_processes

    env: dict[str, str] = {"PYTHONWARNINGS": "ignore::FutureWarning,ignore::UserWarning"}
    run = subprocess.run([*launch_2_processes("zero3", env), "-m", "interiorfusion_finetune", "grpo", "--config",
                          str(CONFIG), "--set", "rl.policy=full", "--set", "training.num_gpus=2",
                          "--set", "training.batch_size=1", "--input", f"structure={structure_smoke.uri}",
                          "--output", (tmp_path / "out").as_uri()],
                         env=child_env(tmp_path, **env), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    assert "rl.policy: full is refused under DeepSpeed ZeRO-3" in run.stdout + run.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_kill_9_mid_iteration_then_rerun_ends_with_the_same_adapters(grpo_smoke: RunOutcome,
                                                                      structure_smoke: RunOutcome,
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "grpo"
    cmd = [sys.executable, "-m", "interiorfusion_finetune", "grpo", "--config", str(CONFIG),
           "--input", f"structure={structure_smoke.uri}", "--output", out.as_uri()]
    # TMPDIR: the killed run cannot remove its work directory; keep it inside tmp_path.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "INTERIORFUSION_PROGRESS": "log", "TMPDIR": str(tmp_path),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "INTERIORFUSION_HOME": str(tmp_path / "h")}
    log = tmp_path / "first.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        # The smoke config checkpoints at iteration 5: kill during iteration 7 (after step 6 was logged).
        while time.monotonic() < deadline and proc.poll() is None and "step 6/10" not in log.read_text():
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert not (out / "manifest.json").exists()
    second = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from step 5" in second.stdout + second.stderr
    a = load_file(out / "adapters/structure/adapter_model.safetensors")
    b = load_file(_path(grpo_smoke.uri) / "adapters/structure/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _rollout_inputs(structure_smoke: RunOutcome) -> tuple[Any, dict[str, Any]]:
    """(the smoke structure run's generator, a batch of two training conditions, each twice: two groups of 2)."""
    from interiorfusion_core.stage import StageInput
    from interiorfusion_core.storage import open_store
    from interiorfusion_finetune.grpo_stage import GroupedConditions

    gen = load_generator(structure_smoke.uri)
    latents_uri = read_manifest(structure_smoke.uri).inputs["latents"].uri
    store = open_store(latents_uri)
    data = GroupedConditions(StageInput("latents", latents_uri, read_manifest(store), store), "train",
                             gen.resolution, None, group=2)
    return gen, data.collate([data.sample(0), data.sample(1)])


def _rollouts(gen: Any, batch: dict[str, Any], noise: float, flows: tuple[str, ...], config: Any = None) -> Any:
    from interiorfusion_finetune.rollout import sample_rollouts

    return sample_rollouts(gen.model, gen.vae, gen.frozen, config or gen.config, gen.stats[gen.resolution],
                           gen.compression, gen.resolution, batch, 4, noise, torch.Generator().manual_seed(3),
                           group=2, policy_flows=flows)


def test_rollouts_at_noise_zero_are_the_ode_and_a_group_shares_its_start(structure_smoke: RunOutcome) -> None:
    """Both flows as the policy: at noise 0 the SDE rollouts are the ODE's scenes (the same step count); at the
    smoke noise each flow has its trajectory and finite per-step log-probabilities, and a group's two rollouts start
    from one occupancy noise but end in different rooms (the spread GRPO learns from)."""
    from interiorfusion_finetune.rollout import FLOWS

    gen, batch = _rollout_inputs(structure_smoke)
    ode_config = gen.config.model_copy(update={"sampling": gen.config.sampling.model_copy(
        update={"steps": 4, "occupancy_steps": 4})})
    sde0, ode = _rollouts(gen, batch, 0.0, FLOWS), _rollouts(gen, batch, 0.0, (), ode_config)
    assert set(sde0.flows) == set(FLOWS) and not ode.flows
    for a, b in zip(sde0.scenes, ode.scenes, strict=True):
        assert np.array_equal(a.cells, b.cells) and np.array_equal(a.voxels, b.voxels)
    noisy = _rollouts(gen, batch, 0.7, FLOWS)
    occupancy = noisy.flows["occupancy"]
    start = occupancy.trajectory.states[0].view(4, -1)
    assert torch.equal(start[0], start[1]) and torch.equal(start[2], start[3]) and not torch.equal(start[0], start[2])
    end = occupancy.trajectory.states[-1].view(4, -1)
    assert not torch.equal(end[0], end[1])
    for steps in noisy.flows.values():
        assert steps.trajectory.log_probs.shape == (4, 4) and bool(torch.isfinite(steps.trajectory.log_probs).all())


def test_the_truth_scene_is_the_conditions_own_latents_decoded(structure_smoke: RunOutcome) -> None:
    """The report's ceiling (truth_reward) scores sample 0's true cells and latents through the VAE: its cells are
    the sample's own, and its voxels are what the VAE decodes them to, not another sample's."""
    from interiorfusion_finetune.grpo_stage import truth_scene
    from interiorfusion_structure.generate import decode_scenes

    gen, batch = _rollout_inputs(structure_smoke)
    truth = truth_scene(gen, batch)
    own = batch["coords"][batch["coords"][:, 0] == 0, 1:].numpy()
    assert np.array_equal(np.sort(truth.cells, 0), np.sort(own, 0))
    everyone = decode_scenes(gen.vae, batch["coords"], batch["num_tokens"], batch["feats"], gen.stats[gen.resolution],
                             gen.compression, gen.resolution, batch, {})
    assert np.array_equal(truth.voxels, everyone[0].voxels)
    other = next(s for s in everyone if len(s.cells) != len(own) or not np.array_equal(s.cells, everyone[0].cells))
    assert not np.array_equal(truth.voxels, other.voxels)
