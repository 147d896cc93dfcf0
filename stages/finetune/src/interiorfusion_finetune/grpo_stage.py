"""Stage 4b: GRPO reinforcement fine-tuning of the Structure DiT with geometric rewards (Flow-GRPO's recipe).

Each iteration (one engine step), per rank: `training.batch_size` conditions from the training split, each sampled
`rl.group_size` times by the SDE (sde.py) with per-step log-probabilities; every rollout decoded and scored by the
rewards (rewards.py, the config's weights); advantages normalised per group (grpo.py); then one policy-gradient
update through the LoRA adapters on the policy's flows (`rl.policy_flows`, default both: the occupancy
and the latent flow):

    loss = mean over the chosen steps k of [ −min(r_k·A, clip(r_k, 1 ± ε)·A) + β·KL_k(π_θ ‖ π_ref) ]

with r_k = exp(ℓ_θ − ℓ_old), ℓ the step's Gaussian log-density *per dimension* (the sample's tokens × channels, as
Flow-GRPO: a sum over thousands of dimensions would put every ratio outside any clip range), KL in closed form per
dimension, π_ref the same network with its adapters disabled. Rollouts are drawn from (seed, iteration, rank), so a
resumed run repeats them and ends with the same adapters.

Inputs: `structure` (the base), optionally `lora` (start from its merged weights; its real scans are then the
conditions). Outputs: `adapters/structure/` (peft), `merged/structure.safetensors` (what generate loads), `eval.json`
(held-out conditions: reward of the tuned and of the base policy, ODE samples).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from interiorfusion_core.contract import Stage, StageContext, StageResult
from interiorfusion_core.engine import Trainer
from interiorfusion_core.engine.step import StepContext
from interiorfusion_core.engine.task import TrainTask
from interiorfusion_core.errors import UserError
from interiorfusion_core.manifest import read_manifest
from interiorfusion_core.stage import StageInput
from interiorfusion_core.storage import open_store
from interiorfusion_finetune.adapters import adapters_disabled, wrap
from interiorfusion_finetune.config import LoRAConfig, RLFinetuneConfig
from interiorfusion_finetune.edit_batches import EditBatch, EditPairs
from interiorfusion_finetune.grpo import clipped_policy_loss, gaussian_kl, group_advantages
from interiorfusion_finetune.lora_stage import load_tuned, write_tuned_structure
from interiorfusion_finetune.rewards import REWARDS, EditPair, RewardModel, View
from interiorfusion_finetune.rollout import Rollout, flow_velocity, sample_rollouts
from interiorfusion_finetune.sde import gaussian_log_prob, sde_std, step_mean
from interiorfusion_structure.generate import Generator, generate_scenes, load_generator, scene_preview
from interiorfusion_structure.model import StructureModel
from interiorfusion_structure.stage import stack_pngs
from interiorfusion_structure.task import StructureData, StructureLoader, batch_to_device

if TYPE_CHECKING:
    from interiorfusion_structure.conditions import ConditionTokens  # imports transformers: not at import

log = logging.getLogger("interiorfusion_finetune")


class GroupedConditions(StructureData):
    """Condition views of one split, each collated `group` times in a row (a GRPO group per condition)."""

    def __init__(self, latents: Any, split: str, resolution: int, data_uri: str | None, group: int):
        super().__init__(latents, split, resolution, data_uri)
        self.group = group

    def collate(self, samples: Any) -> dict[str, Any]:
        return super().collate([s for s in samples for _ in range(self.group)])


def policy_flow_targets(model: nn.Module, cfg: LoRAConfig, flows: list[str]) -> LoRAConfig:
    """The LoRA targets restricted to the blocks of the policy's flows (`rl.policy_flows`): a flow sampled by its
    ODE gets no policy gradient, so adapters there would stay at zero."""
    from interiorfusion_finetune.adapters import targeted_modules

    names = [n for n in targeted_modules(model, cfg) if n.split(".", 1)[0] in flows]
    if not names:
        raise UserError(f"lora.target_modules {list(cfg.target_modules)} match no layer of the policy's flows "
                        f"{flows} (rl.policy_flows)")
    return cfg.model_copy(update={"target_modules": names})


class CurveLoader:
    """The conditions' StructureLoader, whose state also carries the task's reward curve so far: a resumed run's
    curve (and its report) covers every iteration, not only those after the resume."""

    def __init__(self, inner: StructureLoader, task: GRPOTask):
        self.inner, self.task = inner, task

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Any:
        return iter(self.inner)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {**self.inner.state_dict(), "curve": list(self.task.curve)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)
        self.task.curve = [dict(r) for r in state.get("curve", [])]


class GRPOTask(TrainTask):
    unit_name = "rollouts"
    partition_at_init = False  # base weights loaded whole; peft's zero B written into its own tensors

    def __init__(self, ctx: StageContext, config: RLFinetuneConfig, base: Generator, conditions: Any,
                 data_uri: str | None, start: Mapping[str, torch.Tensor] | None, edits_uri: str | None = None):
        self.ctx, self.config, self.base = ctx, config, base
        self.conditions, self.data_uri, self.start = conditions, data_uri, start
        self.edits_uri = edits_uri  # the edit pairs' dataset (None: the conditions' own)
        self.edits: EditPairs | None = None
        self.resolution = base.resolution
        # The base's normalisation, also for a LoRA run's scans (it encoded them with the base's statistics).
        self.stats = base.stats[self.resolution]
        self.rewards: RewardModel | None = None
        self.curve: list[dict[str, float]] = []  # per iteration (this rank): reward, KL, clip fraction, ...

    def prepare(self, runtime: Any) -> None:
        rl = self.config.rl
        if rl.policy == "full" and runtime.deepspeed and runtime.zero_stage == 3:
            raise UserError("rl.policy: full is refused under DeepSpeed ZeRO-3 (full-model GRPO hangs there); use "
                            "rl.policy: lora, or a ZeRO-0/1/2 or DDP launcher config")
        self.rewards = RewardModel(rl, device=str(runtime.device))
        if rl.edit_every:
            uri = self.edits_uri or StructureData(self.conditions, "train", self.resolution, self.data_uri).data.uri
            self.edits = EditPairs(uri)
            log.info("grpo: every %d. iteration samples %d edit pairs of %s", rl.edit_every, len(self.edits), uri)

    def starting_model(self) -> StructureModel:
        """A fresh StructureModel with the starting weights (the LoRA run's merged ones, else the base's)."""
        model = StructureModel(self.base.config, self.base.model.latent_channels)
        model.load_state_dict(self.start if self.start is not None else self.base.model.state_dict())
        return model

    def build_model(self, config: Any) -> nn.Module:
        model = self.starting_model()
        if self.config.rl.policy == "full":
            return model
        return wrap(model, policy_flow_targets(model, self.config.lora, self.config.rl.policy_flows), "structure")

    def frozen_models(self, config: Any) -> Mapping[str, nn.Module]:
        frozen: dict[str, nn.Module] = {**self.base.frozen, "vae": self.base.vae}
        if self.config.rl.policy == "full":  # the reference policy: a frozen copy of the starting weights
            frozen["reference"] = self.starting_model()
        return frozen

    def encoders(self) -> dict[str, nn.Module]:
        return {k: v for k, v in self.frozen.items() if k not in ("vae", "reference")}

    def make_loader(self, phase: Any, rank: int, world_size: int, seed: int) -> CurveLoader:
        data = GroupedConditions(self.conditions, "train", self.resolution, self.data_uri, self.config.rl.group_size)
        return CurveLoader(StructureLoader(data, self.config.training.batch_size, 1 << 30, shuffle=True, seed=seed,
                                           rank=rank, world_size=world_size, random_views=True), self)

    def compute_losses(self, model: nn.Module, batch: Any) -> Mapping[str, torch.Tensor]:
        raise NotImplementedError("GRPO has no supervised loss; its steps are train_step")  # no val_batches

    def batch_size_of(self, batch: Any) -> int:
        return len(batch["rgb"])

    def count_units(self, batch: Any) -> int:
        return len(batch["rgb"])

    def to_device(self, batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
        return batch_to_device(batch, device, dtype)

    # ---- one iteration
    def train_step(self, step: StepContext) -> Mapping[str, torch.Tensor]:
        cfg, rl = self.config, self.config.rl
        module = step.module
        module.eval()  # no condition dropout: the rollout's and the update's velocities are the same function
        seed = _stream(cfg.training.seed, step.step, step.rank, step.micro)
        edit = self.edit_batch(step, seed) if self.is_edit_iteration(step.step) else None
        batch = step.next_batch() if edit is None else self.to_device(edit.after, step.device)
        B = len(batch["rgb"])
        gen = torch.Generator().manual_seed(seed)
        rollout = sample_rollouts(module, self.frozen["vae"], self.encoders(), self.base.config, self.stats,
                                  self.base.compression, self.resolution, batch, rl.sampling_steps,
                                  rl.sde_noise_level, gen, group=rl.group_size, policy_flows=rl.policy_flows,
                                  stochastic=rl.sde_window)
        assert self.rewards is not None
        pairs = None if edit is None else self.edit_pairs(step, edit, rollout, seed)
        results = self.rewards.batch(rollout.scenes, batch, pairs)
        totals = torch.tensor([r.total for r in results], dtype=torch.float64)
        groups = torch.arange(B) // rl.group_size
        adv = group_advantages(totals, groups, rl.advantage_std)
        loss, policy, kl, clipped = self._objective(step, rollout, adv.values.to(step.device),
                                                    adv.keep.to(step.device), gen)
        step.backward(loss)
        out = {"loss": loss.detach(), "policy": policy, "kl": kl, "clip_fraction": clipped,
               "reward": totals.mean().float(), "reward_std": totals.std(unbiased=False).float(),
               "advantage_spread": torch.tensor(adv.spread, dtype=torch.float32),
               "skipped_groups": torch.tensor(float(adv.skipped_groups))}
        for name in self.logged_rewards():
            out[f"reward_{name}"] = torch.tensor(float(np.mean([r.values.get(name, np.nan) for r in results])))
        out["edit_iteration"] = torch.tensor(float(edit is not None))
        row = {"step": step.step, **{k: float(v) for k, v in out.items()}}
        if edit is not None:
            # Only edit iterations have it, so it is logged here, not averaged into the trainer's window.
            row["reward_edit_quality"] = float(np.mean([r.values["edit_quality"] for r in results]))
            if step.rank == 0 and step.micro == 0:
                self.ctx.tracker.log_metrics({"train/reward_edit_quality": row["reward_edit_quality"]},
                                             step=step.step)
        self.curve.append(row)
        if step.rank == 0 and rl.log_renders_every and step.step % rl.log_renders_every == 0 and step.micro == 0:
            best = int(torch.argmax(totals))
            self.ctx.tracker.log_image(scene_preview(rollout.scenes[best], batch, best),
                                       f"rollouts/step-{step.step:08d}.png")
        return {k: torch.as_tensor(v, dtype=torch.float32, device=step.device) for k, v in out.items()}

    def logged_rewards(self) -> list[str]:
        """The rewards every rollout gets (the same keys every iteration): those with a weight, less edit_quality
        (edit iterations only; logged on its own)."""
        weights = self.config.rl.reward_weights.model_dump()
        return [n for n in REWARDS if weights[n] > 0 and n != "edit_quality"]

    # ---- edit iterations
    def is_edit_iteration(self, iteration: int) -> bool:
        every = self.config.rl.edit_every
        return self.edits is not None and every > 0 and iteration % every == 0

    def edit_batch(self, step: StepContext, seed: int) -> EditBatch:
        """This iteration's edit pairs: drawn from (seed, iteration, rank) like the rollouts, so a resumed run
        repeats them; the conditions' loader is not advanced."""
        assert self.edits is not None
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0xED17]))
        return self.edits.batch(rng, self.config.training.batch_size, self.config.rl.group_size, self.resolution,
                                self.base.compression)

    @torch.no_grad()
    def edit_pairs(self, step: StepContext, edit: EditBatch, rollout: Rollout, seed: int) -> list[EditPair]:
        """Each rollout against the reference policy's scene from its pair's `before` conditions: the ODE (noise
        level 0) from the same starting noise as the group's occupancy, so outside the edit the two scenes differ
        only as far as the policy makes them."""
        rl = self.config.rl
        before = self.to_device(edit.before, step.device)
        reference = self.frozen["reference"] if rl.policy == "full" else step.module
        with adapters_disabled(step.module) if rl.policy == "lora" else contextlib.nullcontext():
            ref = sample_rollouts(reference, self.frozen["vae"], self.encoders(), self.base.config, self.stats,
                                  self.base.compression, self.resolution, before, rl.sampling_steps, 0.0,
                                  torch.Generator().manual_seed(seed), group=1, policy_flows=rl.policy_flows)
        G = rl.group_size
        return [EditPair(ref.scenes[b // G], scene, edit.boxes[b // G]) for b, scene in enumerate(rollout.scenes)]

    def _objective(self, step: StepContext, rollout: Rollout, advantages: torch.Tensor, keep: torch.Tensor,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, policy term, KL, clip fraction), each the mean over the chosen steps of every policy flow."""
        rl, beta = self.config.rl, self.config.training.kl_penalty
        B = rollout.size
        policy = torch.zeros((), device=step.device)
        kl = torch.zeros((), device=step.device)
        clip_fraction = torch.zeros((), device=step.device)
        n = 0
        cond = self._frozen_conditions(rollout)
        for flow in rl.policy_flows:
            steps = rollout.flows[flow]
            traj, token_sample, dims = steps.trajectory, steps.segments.ids(), steps.dims.to(step.device)
            K = traj.random_steps  # deterministic steps have no log-probability to learn from
            chosen = sorted(torch.randperm(K, generator=gen)[: max(1, round(rl.timestep_fraction * K))].tolist())
            policy_v = flow_velocity(step.model, rollout.batch, flow, steps, cond)
            ref_v = self._reference_velocity(step, rollout, flow, cond)
            for k in chosen:
                t, t_next = traj.grid[k], traj.grid[k + 1]
                std = sde_std(t, rl.sde_noise_level) * math.sqrt(t_next - t)
                mean = step_mean(policy_v, traj, k, B, rl.sde_noise_level)
                log_prob = gaussian_log_prob(traj.states[k + 1], mean, std, token_sample, B) / dims
                old = traj.log_probs[k] / dims
                if bool(keep.any()):
                    term, clipped = clipped_policy_loss(log_prob[keep], old[keep], advantages[keep], rl.clip_range)
                else:  # every group flat: no preference to learn from (only the KL acts)
                    term, clipped = 0.0 * log_prob.sum(), torch.zeros((), device=step.device)
                with torch.no_grad():
                    ref_mean = step_mean(ref_v, traj, k, B, rl.sde_noise_level)
                policy = policy + term
                kl = kl + (gaussian_kl(mean, ref_mean, std, token_sample, B) / dims).mean()
                clip_fraction = clip_fraction + clipped
                n += 1
        policy, kl = policy / n, kl / n
        return policy + beta * kl, policy.detach(), kl.detach(), clip_fraction / n

    def _frozen_conditions(self, rollout: Rollout) -> ConditionTokens | None:
        """The condition tokens the update reuses: the rollout's own where the condition encoder is frozen (LoRA
        adapters sit on the flows' blocks only, so it is the same function for the rollout, the policy and its
        reference); None under `rl.policy: full`, where it trains and each forward encodes with its gradient.
        Encoding in every step's forward was most of an iteration's update time."""
        return None if self.config.rl.policy == "full" else rollout.cond

    def _reference_velocity(self, step: StepContext, rollout: Rollout, flow: str,
                            cond: ConditionTokens | None) -> Any:
        steps = rollout.flows[flow]
        if self.config.rl.policy == "full":
            return flow_velocity(self.frozen["reference"], rollout.batch, flow, steps)
        inner = flow_velocity(step.module, rollout.batch, flow, steps, cond)

        def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with adapters_disabled(step.module):
                return inner(x, t)
        return v


def _stream(seed: int, iteration: int, rank: int, micro: int) -> int:
    key = np.random.SeedSequence([seed, iteration, rank, micro, 0x6B7F])
    return int(key.generate_state(1, np.uint64)[0] >> 1)


class GRPOStage(Stage):
    config_model = RLFinetuneConfig

    def run(self, ctx: StageContext) -> StageResult:
        config: RLFinetuneConfig = ctx.config
        structure_uri = ctx.inputs["structure"].uri
        base = load_generator(structure_uri, "cpu", Path(ctx.work_dir))
        conditions, data_uri, start = _conditions(ctx, base)
        edits_uri = ctx.inputs["data"].uri if "data" in ctx.inputs else None
        task = GRPOTask(ctx, config, base, conditions, data_uri, start, edits_uri)
        trainer = Trainer(ctx, task)
        result = trainer.fit()
        rt = trainer.rt
        metrics = dict(result.metrics) | curve_summary(task.curve)
        outputs: dict[str, str] = {"checkpoint": result.checkpoint}
        tuned = load_tuned(ctx, result.checkpoint, task)
        report = held_out_rewards(tuned, task, rt.device)
        if rt.is_main:
            outputs |= write_tuned_structure(ctx, tuned, adapters=config.rl.policy == "lora", merged=True)
            ctx.output.put_json("curve.json", {"rank": 0, "iterations": task.curve})
            outputs["curve"] = "curve.json"
            if report is not None:
                ctx.output.put_json("eval.json", report)
                # held-out: heldout_reward, heldout_base_reward; the training prompts: train_reward, ...
                named = {(k if k.startswith("train_") else f"heldout_{k}"): v for k, v in report["metrics"].items()}
                metrics |= named
                # (not train/…: that is the rollouts' reward per iteration)
                ctx.tracker.log_metrics({(f"train_prompts/{k[6:]}" if k.startswith("train_") else
                                          k.replace("_", "/", 1)): v for k, v in named.items()}, step=result.step)
        return StageResult(metrics=metrics, outputs=outputs)


def curve_summary(curve: list[dict[str, float]]) -> dict[str, float]:
    """The reward curve in a few numbers (rank 0's rollouts): first, last, mean and last-half mean reward, the KL
    at the first iteration and its maximum."""
    if not curve:
        return {}
    by_step: dict[int, list[dict[str, float]]] = {}
    for row in curve:
        by_step.setdefault(int(row["step"]), []).append(row)
    steps = sorted(by_step)
    reward = [float(np.mean([r["reward"] for r in by_step[s]])) for s in steps]
    kl = [float(np.mean([r["kl"] for r in by_step[s]])) for s in steps]
    half = reward[len(reward) // 2:]
    out = {"reward_first": reward[0], "reward_last": reward[-1], "reward_mean": float(np.mean(reward)),
           "reward_last_half": float(np.mean(half)), "kl_first": kl[0], "kl_max": float(max(kl)),
           "iterations_recorded": float(len(steps))}
    edits = [float(np.mean([r["reward_edit_quality"] for r in by_step[s]])) for s in steps
             if "reward_edit_quality" in by_step[s][0]]
    if edits:
        out |= {"edit_iterations": float(len(edits)), "edit_quality_first": edits[0], "edit_quality_last": edits[-1],
                "edit_quality_mean": float(np.mean(edits))}
    return out


def _conditions(ctx: StageContext, base: Generator) -> tuple[Any, str | None, dict[str, torch.Tensor] | None]:
    """(the latents whose condition views are the prompts, their data URI, the starting weights): the LoRA run's
    real scans and merged weights when a `lora` input is given, else the base run's training data."""
    from safetensors.torch import load_file

    if "lora" in ctx.inputs:
        lora = ctx.inputs["lora"]
        if "structure_weights" not in lora.manifest.outputs:
            raise UserError(f"{lora.uri}: this LoRA run wrote no merged weights (lora.merge was false); GRPO starts "
                            "from them")
        start = load_file(str(lora.open(lora.manifest.outputs["structure_weights"])))
        return StageInput("latents", lora.uri, None, lora.store), lora.manifest.inputs["data"].uri, start  # type: ignore[arg-type]
    latents_uri = read_manifest(open_store(ctx.inputs["structure"].uri)).inputs["latents"].uri
    store = open_store(latents_uri)
    return StageInput("latents", latents_uri, read_manifest(store), store), None, None


def truth_scene(gen: Generator, batch: Mapping[str, Any]) -> Any:
    """Sample 0's own latents (its true cells and the VAE's encoding of its room) decoded by the VAE: what a
    perfect Structure DiT would generate. Its reward is the ceiling GRPO can reach through this VAE; where it is
    no higher than the base policy's, the reward cannot tell the true room from the base's and GRPO has nothing
    to climb (the smoke VAE: docs/finetune.md)."""
    from interiorfusion_structure.generate import decode_scenes

    rows = batch["coords"][:, 0] == 0
    return decode_scenes(gen.vae, batch["coords"][rows], batch["num_tokens"][:1], batch["feats"][rows],
                         gen.stats[gen.resolution], gen.compression, gen.resolution, batch, {"sampler": "truth"})[0]


@torch.no_grad()
def held_out_rewards(model: nn.Module, task: GRPOTask, device: torch.device) -> dict[str, Any] | None:
    """Held-out conditions generated by the ODE with the tuned policy and with the base (adapters disabled, or the
    starting weights), scored by the same rewards, beside the reward of the condition's true latents decoded by
    the VAE (`truth_reward`: the ceiling, see truth_scene)."""
    cfg = task.config
    assert task.rewards is not None
    model = model.to(device).eval()
    gen = Generator(model, task.base.vae.to(device), {k: v.to(device) for k, v in task.base.frozen.items()},
                    task.base.config, {task.resolution: task.stats}, task.base.compression, task.resolution)
    rows: list[dict[str, Any]] = []
    previews: list[bytes] = []
    remaining = cfg.eval.samples
    # The training prompts first (their own budget), then the held-out splits (sharing eval.samples).
    plan = [("train", cfg.eval.train_samples, True)] + [(s, None, False) for s in cfg.eval.splits]
    for split, budget, trained in plan:
        try:
            data = StructureData(task.conditions, split, task.resolution, task.data_uri)
        except UserError:
            continue
        if trained:
            n = min(len(data), budget)
        else:
            n = min(len(data), remaining)
            remaining -= n
        for i in range(n):
            batch = batch_to_device(data.collate([data.sample(i)]), device)
            tuned_scene = generate_scenes(gen, batch)[0]
            if cfg.rl.policy == "lora":
                with adapters_disabled(model):
                    base_scene = generate_scenes(gen, batch)[0]
            else:
                ref = copy.copy(gen)
                ref.model = task.frozen["reference"]
                base_scene = generate_scenes(ref, batch)[0]
            view = View.from_batch(batch, 0)
            tuned, base = task.rewards(tuned_scene, view), task.rewards(base_scene, view)
            truth = task.rewards(truth_scene(gen, batch), view)
            if len(previews) < 2 and not trained:  # tuned above, base below
                previews += [scene_preview(tuned_scene, batch, 0), scene_preview(base_scene, batch, 0)]
            rows.append({"key": batch["keys"][0], "split": split, "trained": trained, "reward": tuned.total,
                         "base_reward": base.total, "truth_reward": truth.total, "values": tuned.values,
                         "base_values": base.values, "truth_values": truth.values})
    held = [r for r in rows if not r["trained"]]
    seen = [r for r in rows if r["trained"]]
    if not rows:
        return None
    if previews and task.ctx.rank == 0:
        task.ctx.tracker.log_image(stack_pngs(previews), "grpo_heldout.png")
    metrics: dict[str, float] = {}
    if held:
        metrics |= {k: float(np.mean([r[k] for r in held])) for k in ("reward", "base_reward", "truth_reward")}
    if seen:
        metrics |= {f"train_{k}": float(np.mean([r[k] for r in seen]))
                    for k in ("reward", "base_reward", "truth_reward")}
    return {"samples": len(held), "train_samples": len(seen), "sampler": "ode", "metrics": metrics, "records": rows}


__all__ = ["GRPOStage", "GRPOTask", "GroupedConditions", "held_out_rewards"]
