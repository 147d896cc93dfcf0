"""GRPO's objective on SDE rollouts (Flow-GRPO): group-normalised advantages, the PPO-clipped ratio per step and
the KL to the reference policy.

- Advantages: each condition is sampled `group_size` times; a rollout's advantage is its reward minus its group's
  mean, divided by the std of its group (`advantage_std: group`) or of the whole batch (`batch`). A group whose
  rewards are all equal carries no preference: its advantages are zero and it is left out of the loss (it would
  only add the KL), and counted in `skipped_groups`.
- Policy loss per step k: −min(r·A, clip(r, 1 − ε, 1 + ε)·A) with r = exp(log π_θ(x_{k+1}|x_k) − log π_old(…)),
  averaged over rollouts and steps.
- KL: both policies' steps are Gaussians with the same std, so KL(π_θ ‖ π_ref) per step is
  ‖μ_θ − μ_ref‖² / (2·std²) (per sample, summed over its tokens and channels like the log-probabilities), the
  reference being the same network with its LoRA adapters disabled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class Advantages:
    values: torch.Tensor  # [N] per rollout
    keep: torch.Tensor  # [N] bool: in a group with a reward spread
    skipped_groups: int
    spread: float  # the mean within-group reward std (what the normalisation divides by)


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, std: Literal["group", "batch"] = "group",
                     eps: float = 1e-6) -> Advantages:
    """rewards [N] and each rollout's group id [N] → advantages normalised per group (see the module doc)."""
    rewards = rewards.double()
    values = torch.zeros_like(rewards)
    keep = torch.zeros(len(rewards), dtype=torch.bool)
    skipped, spreads = 0, []
    batch_std = float(rewards.std(unbiased=False)) if len(rewards) > 1 else 0.0
    for g in torch.unique(groups):
        rows = groups == g
        r = rewards[rows]
        s = float(r.std(unbiased=False)) if len(r) > 1 else 0.0
        spreads.append(s)
        if s <= eps:
            skipped += 1
            continue
        denom = s if std == "group" else max(batch_std, eps)
        values[rows] = (r - r.mean()) / denom
        keep[rows] = True
    return Advantages(values.float(), keep, skipped, float(sum(spreads) / max(len(spreads), 1)))


def clipped_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the mean clipped surrogate loss over rollouts, the fraction of rollouts whose ratio was clipped) for one
    step's per-rollout log-probabilities."""
    ratio = torch.exp(log_prob.float() - old_log_prob.float())
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    clip_fraction = ((ratio - 1.0).abs() > clip_range).float().mean()
    return loss, clip_fraction


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: float, token_sample: torch.Tensor, batch: int
                ) -> torch.Tensor:
    """[B] KL(N(mean, std²) ‖ N(ref_mean, std²)) per sample, summed over its tokens and channels."""
    per_token = ((mean.float() - ref_mean.float()) ** 2).sum(-1) / (2.0 * std**2)
    return torch.zeros(batch, dtype=torch.float32, device=mean.device).index_add_(0, token_sample, per_token)


__all__ = ["Advantages", "clipped_policy_loss", "gaussian_kl", "group_advantages"]
