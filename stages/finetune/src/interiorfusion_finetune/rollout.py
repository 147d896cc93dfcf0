"""GRPO rollouts of the Structure DiT: for a batch of conditions, the coarse occupancy by its ODE and the latent flow
by the SDE (sde.py), each step's log-probability recorded; then the VAE's geometry decode into scenes.

The policy is the latent flow: the occupancy flow's cells are sampled by its ODE with the current network (part of
the environment in this version), one draw per group, so a group's rollouts share their cells and differ only by
the policy's actions. Everything a
policy-gradient pass needs to recompute a step's log-probability (the cells, their segments, the lifted depth, the
encoded-condition batch) is kept in the `Rollout`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from interiorfusion_finetune.sde import Trajectory, sample_sde
from interiorfusion_structure.attention import Segments
from interiorfusion_structure.config import DiTStructureConfig
from interiorfusion_structure.flow import sample_ode
from interiorfusion_structure.generate import GeneratedScene, decode_scenes, occupied_cells
from interiorfusion_structure.model import FlowInput, patchify, unpatchify


@dataclass
class Rollout:
    batch: dict[str, Any]  # the condition batch with the frozen features (what the network's forward takes)
    cells: torch.Tensor  # [T, 4] latent cells (sample, x, y, z)
    segments: Segments
    lifted: torch.Tensor | None  # [T, C] the lifted condition depth per cell (None: the model has no lift)
    trajectory: Trajectory  # the latent SDE's states and log-probabilities [K, B]
    scenes: list[GeneratedScene]

    @property
    def size(self) -> int:
        return len(self.scenes)


def latent_velocity(forward: Callable[..., Mapping[str, torch.Tensor]], rollout_batch: Mapping[str, Any],
                    cells: torch.Tensor, segments: Segments, lifted: torch.Tensor | None
                    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """v(x, t [B]) of the latent flow on the rollout's cells through `forward` (the wrapped model: DDP and
    DeepSpeed hooks fire; StructureModel.forward's signature)."""
    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return forward(rollout_batch, FlowInput(x, cells, segments, t, lifted), None)["latent"]
    return v


@torch.no_grad()
def sample_rollouts(model: nn.Module, vae: nn.Module, frozen: Mapping[str, nn.Module], config: DiTStructureConfig,
                    stats: tuple[torch.Tensor, torch.Tensor], compression: int, resolution: int,
                    batch: Mapping[str, Any], steps: int, noise_level: float, generator: torch.Generator,
                    group: int = 1) -> Rollout:
    """One rollout per sample of `batch`, whose samples come in groups of `group` consecutive copies of one
    condition. A group shares its coarse occupancy draw: its rollouts differ only by the latent SDE, the policy's own
    actions, so the group's reward spread is the policy's doing (the occupancy draw would otherwise add a reward
    variance the policy cannot influence to every advantage). `model` is the unwrapped network; rollouts need no
    gradients, so no wrapper's hooks."""
    from interiorfusion_structure.conditions import frozen_features
    from interiorfusion_structure.lifting import cell_values, patch_values
    from interiorfusion_structure.task import lifted_depth

    device = next(model.parameters()).device
    R = resolution // compression
    B = len(batch["rgb"])
    cond_batch = {**batch, **frozen_features(frozen, batch, None)}
    cond = model.encode_conditions(cond_batch, None)
    t_range = config.flow_matching.t_range
    lifted_grid = lifted_depth(batch, R) if config.model.lift_depth else None

    # 1. Coarse occupancy: the ODE with the current network.
    p = min(config.occupancy.patch, R)
    _, o_coords = patchify(torch.zeros(B, R, R, R, device=device), p)
    o_coords = o_coords.to(device)
    per = len(o_coords) // B
    o_segs = Segments.from_lengths([per] * B).to(device)
    o_lift = None if lifted_grid is None else patch_values(lifted_grid, p)

    def occ_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model.velocity("occupancy", FlowInput(x, o_coords, o_segs, t, o_lift), cond).float()

    if B % group:
        raise ValueError(f"{B} samples do not make whole groups of {group}")
    o0 = torch.randn(B // group, per, p**3, generator=generator).repeat_interleave(group, 0).reshape(-1, p**3)
    o0 = o0.to(device)
    grid = unpatchify(sample_ode(occ_velocity, o0, B, config.sampling.occupancy_steps, t_range), B, R, p)
    cells, counts = occupied_cells(grid, config.sampling.occupancy_threshold)
    segments = Segments.from_lengths(counts.cpu()).to(device)
    lifted = None if lifted_grid is None else cell_values(lifted_grid, cells)

    # 2. Latents on those cells: the SDE, log-probabilities per step.
    x0 = torch.randn(len(cells), model.latent_channels, generator=generator).to(device)
    velocity = latent_velocity(model, cond_batch, cells, segments, lifted)
    traj = sample_sde(lambda x, t: velocity(x, t).float(), x0, segments.ids(), B, steps, t_range, noise_level,
                      generator)

    # 3. Decode with the VAE's geometry branch.
    scenes = decode_scenes(vae, cells, counts, traj.x1, stats, compression, resolution, batch,
                           {"sampler": "sde", "steps": steps, "noise_level": noise_level})
    return Rollout(cond_batch, cells, segments, lifted, traj, scenes)


__all__ = ["Rollout", "latent_velocity", "sample_rollouts"]
