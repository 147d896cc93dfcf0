"""Stage 3's network: the structure stage's condition encoder and DiT backbone, as a rectified flow over the VAE's
material latents on the geometry's latent cells.

Material tokens are the geometry's latent cells (one token per cell, the same packed order). Each token's input is
the noised material latent; its per-token condition (the DiT's `token_cond`, added after the input projection) is
the normalised geometry latent of that cell, the geometry-noise level it carries (see config
`GeometryConditionConfig`) and, with `model.lift_depth`, the condition depth lifted into the cell. The image,
depth, layout, semantic and camera tokens enter by cross-attention and AdaLN, as in stage 2.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from interiorfusion_structure.attention import Segments
from interiorfusion_structure.dit import DiT
from interiorfusion_structure.lifting import CHANNELS as LIFT_CHANNELS
from interiorfusion_structure.model import DEFAULT_LATENT_CHANNELS, FlowInput

if TYPE_CHECKING:
    from interiorfusion_material.config import DiTMaterialConfig
    from interiorfusion_structure.conditions import ConditionTokens


def token_cond_channels(config: DiTMaterialConfig, latent_channels: int) -> int:
    """Geometry latent + its noise level (+ the lifted depth)."""
    return latent_channels + 1 + (LIFT_CHANNELS if config.model.lift_depth else 0)


class MaterialModel(nn.Module):
    def __init__(self, config: DiTMaterialConfig, latent_channels: int = DEFAULT_LATENT_CHANNELS):
        from interiorfusion_structure.conditions import ConditionEncoder  # transformers: imported on use

        super().__init__()
        m = config.model
        a = m.attention
        cond = m.conditioning
        self.latent_channels = latent_channels
        self.conditions = ConditionEncoder(cond)
        self.material = DiT(latent_channels, latent_channels, width=m.width, depth=m.depth, heads=m.num_heads,
                            mlp_hidden=m.mlp_hidden, cond_width=cond.width, qk_norm=m.qk_norm, rope=m.rope,
                            rope_theta=m.rope_theta, attention=a.kind, window=a.window, full_every=a.full_every,
                            backend=a.backend, gradient_checkpointing=m.gradient_checkpointing,
                            token_cond_channels=token_cond_channels(config, latent_channels))

    def encode_conditions(self, batch: Mapping[str, Any],
                          drop: Mapping[str, torch.Tensor] | None = None) -> ConditionTokens:
        return self.conditions.encode(batch, drop)

    def velocity(self, x: FlowInput, cond: ConditionTokens) -> torch.Tensor:
        segments = Segments.from_lengths(cond.lengths.cpu()).to(cond.tokens.device)
        return self.material(x.x, x.coords, x.segments, x.t, cond.tokens, segments, cond.pooled, x.token_cond)

    def forward(self, batch: Mapping[str, Any], x: FlowInput,
                drop: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """One training step's velocity (conditions encoded inside, so the engine's wrapper sees one call)."""
        return self.velocity(x, self.encode_conditions(batch, drop))


def geometry_token_cond(geometry: torch.Tensor, level: torch.Tensor, lifted: torch.Tensor | None) -> torch.Tensor:
    """[T, L + 1 (+ 2)]: the (noised) normalised geometry latent, the noise level per token, the lifted depth."""
    parts = [geometry, level[:, None].to(geometry.dtype)]
    if lifted is not None:
        parts.append(lifted.to(geometry.dtype))
    return torch.cat(parts, 1)


__all__ = ["MaterialModel", "geometry_token_cond", "token_cond_channels"]
