"""Stage 2's network: the condition encoder (its trained parts) and two flows with the DiT backbone.

- `occupancy`: the sparse-structure flow. A DiT over the dense occupancy grid of the latent cells (R³, R = data
  resolution / VAE compression), `patch`³ cells per token (space-to-depth), target ±1 per cell. Its sample,
  thresholded, is the set of latent cells to generate.
- `latent`: the seed's 1.3B DiT. The rectified flow over the VAE's (normalised) geometry latents on those cells.

Both read the same condition tokens. `StructureModel.forward` runs one training step's worth of both (so the
engine's wrapper, DDP or DeepSpeed, sees one call); sampling calls `encode_conditions` once and then the flows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from interiorfusion_structure.attention import Segments
from interiorfusion_structure.config import DiTModelConfig, DiTStructureConfig, OccupancyFlowConfig
from interiorfusion_structure.dit import DiT
from interiorfusion_structure.lifting import CHANNELS as LIFT_CHANNELS

if TYPE_CHECKING:
    from interiorfusion_structure.conditions import ConditionTokens

# The VAE's latent width the planner assumes when no latents are at hand (the seed's VAE: latent_dim 64).
DEFAULT_LATENT_CHANNELS = 64


@dataclass
class FlowInput:
    """One flow's noised tokens: x_t [T, C], coords [T, 4] (sample, x, y, z), one segment per sample, t [B]."""

    x: torch.Tensor
    coords: torch.Tensor
    segments: Segments
    t: torch.Tensor
    token_cond: torch.Tensor | None = None  # [T, C] per-token conditions (the lifted depth), when the flow has them


def build_dit(m: DiTModelConfig, channels: int, cond_width: int) -> DiT:
    a = m.attention
    return DiT(channels, channels, width=m.width, depth=m.depth, heads=m.num_heads, mlp_hidden=m.mlp_hidden,
               cond_width=cond_width, qk_norm=m.qk_norm, rope=m.rope, rope_theta=m.rope_theta, attention=a.kind,
               window=a.window, full_every=a.full_every, backend=a.backend,
               gradient_checkpointing=m.gradient_checkpointing,
               token_cond_channels=LIFT_CHANNELS if m.lift_depth else 0)


def build_occupancy_dit(o: OccupancyFlowConfig, m: DiTModelConfig, cond_width: int) -> DiT:
    # Dense and short ((R / patch)³ tokens): full attention; the latent DiT's norm / RoPE / backend choices.
    return DiT(o.patch**3, o.patch**3, width=o.width, depth=o.depth, heads=o.num_heads, mlp_hidden=o.mlp_hidden,
               cond_width=cond_width, qk_norm=m.qk_norm, rope=m.rope, rope_theta=m.rope_theta,
               backend=m.attention.backend, gradient_checkpointing=m.gradient_checkpointing,
               token_cond_channels=LIFT_CHANNELS * o.patch**3 if m.lift_depth else 0)


class StructureModel(nn.Module):
    def __init__(self, config: DiTStructureConfig, latent_channels: int = DEFAULT_LATENT_CHANNELS):
        from interiorfusion_structure.conditions import ConditionEncoder  # transformers: imported on use

        super().__init__()
        cond = config.model.conditioning
        self.latent_channels = latent_channels
        self.patch = config.occupancy.patch
        self.conditions = ConditionEncoder(cond)
        self.latent = build_dit(config.model, latent_channels, cond.width)
        self.occupancy = build_occupancy_dit(config.occupancy, config.model, cond.width)

    def encode_conditions(self, batch: Mapping[str, Any],
                          drop: Mapping[str, torch.Tensor] | None = None) -> ConditionTokens:
        return self.conditions.encode(batch, drop)

    def velocity(self, flow: str, x: FlowInput, cond: ConditionTokens) -> torch.Tensor:
        net = self.latent if flow == "latent" else self.occupancy
        return net(x.x, x.coords, x.segments, x.t, cond.tokens, Segments.from_lengths(cond.lengths.cpu()).to(
            cond.tokens.device), cond.pooled, x.token_cond)

    def forward(self, batch: Mapping[str, Any], latent: FlowInput | None, occupancy: FlowInput | None,
                drop: Mapping[str, torch.Tensor] | None = None, cond: ConditionTokens | None = None
                ) -> dict[str, torch.Tensor]:
        """The flows' velocities; `cond`: the batch's condition tokens when the caller already has them (GRPO
        re-evaluates many steps of one batch with a frozen condition encoder), else encoded here."""
        if cond is None:
            cond = self.encode_conditions(batch, drop)
        out: dict[str, torch.Tensor] = {}
        if latent is not None:
            out["latent"] = self.velocity("latent", latent, cond)
        if occupancy is not None:
            out["occupancy"] = self.velocity("occupancy", occupancy, cond)
        return out


# ------------------------------------------------------------------------------------- occupancy grid tokens
def occupancy_grid(coords: torch.Tensor, batch: int, grid: int) -> torch.Tensor:
    """Dense [B, R, R, R] occupancy (0/1) of the latent cells coords [T, 4] (sample, x, y, z)."""
    occ = torch.zeros(batch, grid, grid, grid, device=coords.device)
    c = coords.long()
    occ[c[:, 0], c[:, 1], c[:, 2], c[:, 3]] = 1.0
    return occ


def patchify(grid: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, R, R, R] → tokens [B·(R/p)³, p³] (sample-major) and their coords [B·(R/p)³, 4] in patch cells."""
    B, R = grid.shape[0], grid.shape[1]
    if R % patch:
        raise ValueError(f"the latent grid {R}³ is not divisible by the occupancy patch {patch}")
    n = R // patch
    tokens = grid.view(B, n, patch, n, patch, n, patch).permute(0, 1, 3, 5, 2, 4, 6).reshape(B * n**3, patch**3)
    axes = torch.arange(n, device=grid.device)
    cell = torch.stack(torch.meshgrid(axes, axes, axes, indexing="ij"), -1).reshape(-1, 3)
    sample = torch.arange(B, device=grid.device).repeat_interleave(n**3)
    return tokens, torch.cat([sample[:, None], cell.repeat(B, 1)], dim=1)


def unpatchify(tokens: torch.Tensor, batch: int, grid: int, patch: int) -> torch.Tensor:
    n = grid // patch
    return tokens.view(batch, n, n, n, patch, patch, patch).permute(0, 1, 4, 2, 5, 3, 6).reshape(
        batch, grid, grid, grid)


def grid_coords(occupied: torch.Tensor) -> torch.Tensor:
    """[B, R, R, R] bool → coords [T, 4] (sample, x, y, z), sample-major (the packed order)."""
    return torch.nonzero(occupied).to(torch.int32)


__all__ = ["FlowInput", "StructureModel", "build_dit", "grid_coords", "occupancy_grid", "patchify", "unpatchify"]
