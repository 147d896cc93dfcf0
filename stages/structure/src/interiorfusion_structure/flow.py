"""The rectified flow of the seed's code, its timestep law and the ODE samplers with classifier-free guidance.

Convention (the seed's): x_t = (1 − t)·x0 + t·x1 with x0 ~ N(0, I) noise and x1 data, so t = 1 is data; the model
predicts the velocity v = x1 − x0 and the loss is its MSE. `sigma_min` / `sigma_max` bound the noise-to-signal
ratio σ = (1 − t) / t, i.e. t ∈ [1 / (1 + sigma_max), 1 / (1 + sigma_min)]: sigma_min is the noise floor (training
never sees exactly clean data, sampling ends there and takes one last x̂1 = x_t + (1 − t)·v̂ step).

Timestep law (`flow_matching.timestep`):
- `uniform`: t ~ U(0, 1) (the seed's code), clamped to the range above;
- `logit_normal` (default, the seed's config): logit(t) ~ N(p_mean, p_std²) in the seed's own t. With p_mean = −1.2
  the median t is σ(−1.2) = 0.23: training concentrates on *noisy* timesteps, where the flow decides the room's
  layout, as TRELLIS.2 does (its logitNormal(1, 1) in its t = 1-is-noise convention is the same emphasis) and as SD3
  found best for rectified flows. Reading the keys as EDM's ln σ ~ N(p_mean, p_std²) instead would put the median
  at t = 0.77 (σ = 0.3), the nearly clean end where the velocity is easiest; we do not.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

# velocity(x_t, t [B], drop) → v̂; `drop` names the condition modalities removed (the empty set: all present).
VelocityFn = Callable[[torch.Tensor, torch.Tensor, frozenset[str]], torch.Tensor]
ALL = "all"  # `drop` entry meaning every modality (the unconditional branch)


def sample_timesteps(n: int, law: str, p_mean: float, p_std: float, t_range: tuple[float, float],
                     generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    if law == "uniform":
        t = torch.rand(n, generator=generator, device=device)
    elif law == "logit_normal":
        t = torch.sigmoid(p_mean + p_std * torch.randn(n, generator=generator, device=device))
    else:
        raise ValueError(f"timestep law must be 'uniform' or 'logit_normal', got {law!r}")
    return t.clamp(*t_range)


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t_tokens: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − t)·x0 + t·x1 with t [T] per token (each token takes its sample's t)."""
    t = t_tokens[:, None].to(x1.dtype)
    return (1 - t) * x0 + t * x1


def one_step_estimate(x_t: torch.Tensor, t_tokens: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x̂1 = x_t + (1 − t)·v̂: where the predicted velocity lands at t = 1."""
    return x_t + (1 - t_tokens[:, None].to(v.dtype)) * v


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: v = v(c) + (scale − 1)·(v(c) − v(∅)) + Σ_m (s_m − 1)·(v(c) − v(c without m)).
    Every scale 1 is exactly the conditional prediction (one network evaluation)."""

    scale: float = 1.0
    per_modality: Mapping[str, float] | None = None

    def branches(self) -> list[frozenset[str]]:
        drops = [frozenset()]
        if self.scale != 1.0:
            drops.append(frozenset({ALL}))
        drops += [frozenset({m}) for m, s in sorted((self.per_modality or {}).items()) if s != 1.0]
        return drops

    def combine(self, outputs: Mapping[frozenset[str], torch.Tensor]) -> torch.Tensor:
        cond = outputs[frozenset()]
        v = cond
        if self.scale != 1.0:
            v = v + (self.scale - 1.0) * (cond - outputs[frozenset({ALL})])
        for m, s in sorted((self.per_modality or {}).items()):
            if s != 1.0:
                v = v + (s - 1.0) * (cond - outputs[frozenset({m})])
        return v


def guided(velocity: VelocityFn, guidance: Guidance) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guidance.combine({drop: velocity(x, t, drop) for drop in guidance.branches()})

    return fn


def time_grid(steps: int, t_range: tuple[float, float]) -> list[float]:
    lo, hi = t_range
    return [lo + (hi - lo) * i / steps for i in range(steps + 1)]


@torch.no_grad()
def sample_ode(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor, batch: int,
               steps: int, t_range: tuple[float, float] = (0.0, 1.0), method: str = "euler",
               grid: Sequence[float] | None = None) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from x(t_min) = x0 to t_max with `steps` Euler or Heun steps, then jump to t = 1
    with the last velocity (x̂1 = x + (1 − t_max)·v). `velocity(x, t [batch])` gets one t per sample."""
    if method not in ("euler", "heun"):
        raise ValueError(f"sampler must be 'euler' or 'heun', got {method!r}")
    if steps < 1:
        raise ValueError(f"sampling needs at least one step, got {steps}")
    ts = list(grid) if grid is not None else time_grid(steps, t_range)
    x = x0
    tdtype = torch.promote_types(x0.dtype, torch.float32)  # never a half-precision time
    full = lambda t: torch.full((batch,), t, dtype=tdtype, device=x0.device)  # noqa: E731
    v = velocity(x, full(ts[0]))
    for t, t_next in itertools.pairwise(ts):
        dt = t_next - t
        if method == "heun":
            x_euler = x + dt * v
            v_next = velocity(x_euler, full(t_next))
            x = x + dt * 0.5 * (v + v_next)
            v = v_next if t_next >= ts[-1] else velocity(x, full(t_next))
        else:
            x = x + dt * v
            v = velocity(x, full(t_next))
    return x + (1.0 - ts[-1]) * v


__all__ = ["ALL", "Guidance", "guided", "interpolate", "one_step_estimate", "sample_ode", "sample_timesteps",
           "time_grid"]
