"""GRPO rollouts of the Structure DiT: for a batch of conditions, the coarse occupancy and then the latents on its
cells, each flow sampled by the SDE (sde.py) where it is part of the policy (`rl.policy_flows`) and by its ODE
where it is not; then the VAE's geometry decode into scenes.

Why the occupancy is part of the policy by default: the geometric rewards are decided mostly by where the cells
are; a policy of the latent flow alone can only move voxels inside cells the ODE fixed, and its group's reward
spread is small next to the spread between prompts. A group shares its starting noise (one draw per condition):
its rollouts then differ only by the SDE's steps, the policy's own actions. Everything a policy-gradient pass needs
to recompute a step's log-probability (each flow's tokens, their segments, the lifted depth, the encoded-condition
batch) is kept in the `Rollout`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from interiorfusion_finetune.sde import Trajectory, sample_sde
from interiorfusion_structure.attention import Segments
from interiorfusion_structure.config import DiTStructureConfig
from interiorfusion_structure.flow import sample_ode
from interiorfusion_structure.generate import GeneratedScene, decode_scenes, occupied_cells
from interiorfusion_structure.model import FlowInput, patchify, unpatchify

if TYPE_CHECKING:
    from interiorfusion_structure.conditions import ConditionTokens  # imports transformers: not at import

FLOWS = ("occupancy", "latent")  # in sampling order


@dataclass
class FlowSteps:
    """One flow's SDE rollout of a batch: its tokens' coords and segments, the lifted depth per token (None: the
    model has no lift) and the trajectory (states, per-step log-probabilities [K, B])."""

    coords: torch.Tensor
    segments: Segments
    lifted: torch.Tensor | None
    trajectory: Trajectory

    @property
    def dims(self) -> torch.Tensor:
        """[B] each sample's dimensions (tokens × channels): the log-probabilities are divided by them."""
        ids = self.segments.ids()
        counts = torch.bincount(ids, minlength=self.trajectory.log_probs.shape[1]).float()
        return counts.clamp(min=1) * self.trajectory.states[0].shape[1]  # a sample with no cells: 0 / 1, not NaN


@dataclass
class Rollout:
    batch: dict[str, Any]  # the condition batch with the frozen features (what the network's forward takes)
    cells: torch.Tensor  # [T, 4] latent cells (sample, x, y, z)
    flows: dict[str, FlowSteps]  # the policy's flows, sampled by the SDE
    cond: ConditionTokens  # the batch's condition tokens as the rollout's network encoded them (no gradient)
    scenes: list[GeneratedScene]

    @property
    def size(self) -> int:
        return len(self.scenes)


def flow_velocity(forward: Callable[..., Mapping[str, torch.Tensor]], rollout_batch: Mapping[str, Any], flow: str,
                  steps: FlowSteps, cond: ConditionTokens | None = None
                  ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """v(x, t [B]) of `flow` on the rollout's tokens through `forward` (the wrapped model: DDP and DeepSpeed hooks
    fire; StructureModel.forward's signature). `cond`: the batch's condition tokens, encoded once, where the
    condition encoder is frozen (else None: encoded in every call, with its gradient)."""
    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        fi = FlowInput(x, steps.coords, steps.segments, t, steps.lifted)
        return forward(rollout_batch, fi if flow == "latent" else None, fi if flow == "occupancy" else None,
                       None, cond)[flow]
    return v


@torch.no_grad()
def sample_rollouts(model: nn.Module, vae: nn.Module, frozen: Mapping[str, nn.Module], config: DiTStructureConfig,
                    stats: tuple[torch.Tensor, torch.Tensor], compression: int, resolution: int,
                    batch: Mapping[str, Any], steps: int, noise_level: float, generator: torch.Generator,
                    group: int = 1, policy_flows: Sequence[str] = FLOWS, stochastic: int | None = None) -> Rollout:
    """One rollout per sample of `batch`, whose samples come in groups of `group` consecutive copies of one
    condition (one starting noise per group, see the module doc). The flows in `policy_flows` are sampled by the
    SDE with `steps` steps (only the first `stochastic` of them random, None: all); the others by their ODE with
    the structure config's sampling steps. `model` is the unwrapped network; rollouts need no gradients, so no
    wrapper's hooks."""
    from interiorfusion_structure.conditions import frozen_features
    from interiorfusion_structure.lifting import cell_values, patch_values
    from interiorfusion_structure.task import lifted_depth

    unknown = set(policy_flows) - set(FLOWS)
    if unknown:
        raise ValueError(f"unknown flows {sorted(unknown)}; the Structure DiT's are {list(FLOWS)}")
    device = next(model.parameters()).device
    R = resolution // compression
    B = len(batch["rgb"])
    if B % group:
        raise ValueError(f"{B} samples do not make whole groups of {group}")
    cond_batch = {**batch, **frozen_features(frozen, batch, None)}
    cond = model.encode_conditions(cond_batch, None)
    t_range = config.flow_matching.t_range
    lifted_grid = lifted_depth(batch, R) if config.model.lift_depth else None
    flows: dict[str, FlowSteps] = {}

    def run(flow: str, x0: torch.Tensor, coords: torch.Tensor, segments: Segments, lifted: torch.Tensor | None,
            ode_steps: int) -> torch.Tensor:
        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model.velocity(flow, FlowInput(x, coords, segments, t, lifted), cond).float()

        if flow not in policy_flows:
            return sample_ode(velocity, x0, B, ode_steps, t_range)
        traj = sample_sde(velocity, x0, segments.ids(), B, steps, t_range, noise_level, generator,
                          stochastic=stochastic)
        flows[flow] = FlowSteps(coords, segments, lifted, traj)
        return traj.x1

    # 1. Coarse occupancy.
    p = min(config.occupancy.patch, R)
    _, o_coords = patchify(torch.zeros(B, R, R, R, device=device), p)
    o_coords = o_coords.to(device)
    per = len(o_coords) // B
    o_segs = Segments.from_lengths([per] * B).to(device)
    o_lift = None if lifted_grid is None else patch_values(lifted_grid, p)
    o0 = torch.randn(B // group, per, p**3, generator=generator).repeat_interleave(group, 0).reshape(-1, p**3)
    o1 = run("occupancy", o0.to(device), o_coords, o_segs, o_lift, config.sampling.occupancy_steps)
    cells, counts = occupied_cells(unpatchify(o1, B, R, p), config.sampling.occupancy_threshold)
    segments = Segments.from_lengths(counts.cpu()).to(device)
    lifted = None if lifted_grid is None else cell_values(lifted_grid, cells)

    # 2. Latents on those cells (their count differs between rollouts once the occupancy is sampled).
    x0 = torch.randn(len(cells), model.latent_channels, generator=generator).to(device)
    x1 = run("latent", x0, cells, segments, lifted, config.sampling.steps)

    # 3. Decode with the VAE's geometry branch.
    scenes = decode_scenes(vae, cells, counts, x1, stats, compression, resolution, batch,
                           {"sampler": "sde", "steps": steps, "noise_level": noise_level,
                            "policy_flows": list(policy_flows)})
    return Rollout(cond_batch, cells, flows, cond, scenes)


__all__ = ["FLOWS", "FlowSteps", "Rollout", "flow_velocity", "sample_rollouts"]
