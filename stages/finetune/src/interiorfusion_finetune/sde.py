"""The flow's ODE as an SDE with the same marginals, sampled with per-step Gaussian log-probabilities (Flow-GRPO).

Convention (the project's, flow.py): x_t = (1 − t)·x0 + t·x1, x0 ~ N(0, I) noise, x1 data, t = 1 is data; the network
predicts v = x1 − x0. Flow-GRPO writes the same path with σ = 1 − t as the noise level, predicts u = x0 − x1 = −v
and uses σ_t = a·√(σ / (1 − σ)). In our t that is

    σ_t = a·√((1 − t) / t)

and its Euler–Maruyama step (their `sde_step_with_logprob`, rewritten with dσ = −Δt, u = −v) is

    x_{t+Δt} = x_t + [v − (a² / (2t))·(x_t − t·v)]·Δt + σ_t·√Δt·ε,   ε ~ N(0, I).

Why it keeps the marginals: x_t − t·v̂ = x̂0 is the predicted noise and the score of p_t is −x̂0 / (1 − t), so the
bracket is v + (σ_t² / 2)·∇log p_t, the drift of the reverse SDE whose diffusion is σ_t. At a = 0 it is exactly the
Euler ODE step of flow.sample_ode, and the sampler ends the same way: one deterministic x̂1 = x + (1 − t_max)·v
jump (no log-probability: it is not random). The singularity at t = 0 is never reached: sampling starts at
flow_matching.t_range's t_min = 1 / (1 + sigma_max) > 0.

Log-probabilities are per sample (summed over its tokens and channels), per step, in float32 whatever the
network's precision (the PPO ratio is exp of a difference of large sums: bf16 would make it noise).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from interiorfusion_structure.flow import time_grid

# velocity(x [T, C], t [B]) → v̂ [T, C]
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def sde_std(t: float, noise_level: float) -> float:
    """σ_t = a·√((1 − t) / t): the per-unit-time diffusion of the step starting at t."""
    return noise_level * math.sqrt((1.0 - t) / t)


def sde_mean(x: torch.Tensor, v: torch.Tensor, t: float, dt: float, noise_level: float) -> torch.Tensor:
    """The step's mean: x + [v − (a² / 2t)·(x − t·v)]·Δt (float32)."""
    x, v = x.float(), v.float()
    return x + (v - (noise_level**2 / (2.0 * t)) * (x - t * v)) * dt


def gaussian_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: float, token_sample: torch.Tensor,
                      batch: int) -> torch.Tensor:
    """[B] log N(x_next; mean, std²·I) per sample: the sum over the sample's tokens and channels (float32)."""
    z = (x_next.float() - mean.float()) / std
    per_token = (-0.5 * z**2 - math.log(std) - LOG_SQRT_2PI).sum(-1)
    return torch.zeros(batch, dtype=torch.float32, device=x_next.device).index_add_(0, token_sample, per_token)


@dataclass
class Trajectory:
    """One SDE rollout: the states x_{t_0..t_K} (x_{t_0} is the initial noise), the time grid, each step's
    log-probability [K, B] under the policy that sampled it, and the final x̂1."""

    states: list[torch.Tensor]
    grid: list[float]
    log_probs: torch.Tensor
    x1: torch.Tensor
    stochastic: int | None = None  # only the first this many steps were random (None: all)

    @property
    def steps(self) -> int:
        return len(self.grid) - 1

    @property
    def random_steps(self) -> int:
        """How many of the first steps drew noise (and so have a log-probability the policy gradient can use)."""
        return self.steps if self.stochastic is None else min(self.stochastic, self.steps)


@torch.no_grad()
def sample_sde(velocity: Velocity, x0: torch.Tensor, token_sample: torch.Tensor, batch: int, steps: int,
               t_range: tuple[float, float], noise_level: float, generator: torch.Generator | None = None,
               grid: Sequence[float] | None = None, stochastic: int | None = None) -> Trajectory:
    """Integrate from x(t_min) = x0 to t_max with `steps` Euler–Maruyama steps of the SDE above, then the
    deterministic jump to t = 1. `token_sample` [T] is each token's sample (per-sample log-probabilities).
    `stochastic`: only the first this many steps are the SDE's, the rest the ODE's Euler steps (Flow-GRPO-Fast's
    window: fewer random dimensions per rollout, each with more effect on the result; None: every step).
    At noise_level 0 the states are exactly sample_ode's (Euler); log-probabilities are then undefined (zeros)."""
    ts = list(grid) if grid is not None else time_grid(steps, t_range)
    x = x0.float()
    states, log_probs = [x], []
    full = lambda t: torch.full((batch,), t, dtype=torch.float32, device=x0.device)  # noqa: E731
    for k, (t, t_next) in enumerate(itertools.pairwise(ts)):
        dt = t_next - t
        v = velocity(x, full(t)).float()
        a = noise_level if stochastic is None or k < stochastic else 0.0
        mean = sde_mean(x, v, t, dt, a)
        std = sde_std(t, a) * math.sqrt(dt)
        if std > 0:
            eps = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
            x = mean + std * eps
            log_probs.append(gaussian_log_prob(x, mean, std, token_sample, batch))
        else:
            x = mean
            log_probs.append(torch.zeros(batch, dtype=torch.float32, device=x.device))
        states.append(x)
    v = velocity(x, full(ts[-1])).float()
    return Trajectory(states, ts, torch.stack(log_probs), x + (1.0 - ts[-1]) * v, stochastic)


def step_log_prob(velocity: Velocity, trajectory: Trajectory, k: int, token_sample: torch.Tensor, batch: int,
                  noise_level: float) -> torch.Tensor:
    """[B] log-probability of the rollout's step k (x_k → x_{k+1}) under `velocity` (with gradients): the policy
    term of the GRPO loss, recomputed by the network being trained (or its reference, adapters disabled)."""
    t, t_next = trajectory.grid[k], trajectory.grid[k + 1]
    dt = t_next - t
    x = trajectory.states[k]
    v = velocity(x, torch.full((batch,), t, dtype=torch.float32, device=x.device)).float()
    mean = sde_mean(x, v, t, dt, noise_level)
    return gaussian_log_prob(trajectory.states[k + 1], mean, sde_std(t, noise_level) * math.sqrt(dt), token_sample,
                             batch)


def step_mean(velocity: Velocity, trajectory: Trajectory, k: int, batch: int, noise_level: float) -> torch.Tensor:
    """The mean of step k under `velocity` (with gradients): the KL between two policies' Gaussian steps of equal
    std is ‖μ_a − μ_b‖² / (2·std²)."""
    t, t_next = trajectory.grid[k], trajectory.grid[k + 1]
    x = trajectory.states[k]
    v = velocity(x, torch.full((batch,), t, dtype=torch.float32, device=x.device)).float()
    return sde_mean(x, v, t, t_next - t, noise_level)


__all__ = ["Trajectory", "gaussian_log_prob", "sample_sde", "sde_mean", "sde_std", "step_log_prob", "step_mean"]
