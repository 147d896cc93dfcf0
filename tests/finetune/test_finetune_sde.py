"""The flow SDE of GRPO: at noise 0 it is the ODE sampler; its log-probabilities are the Gaussian densities of its
steps; with noise it keeps the flow's marginals (checked on a 1-D Gaussian whose exact velocity is known); and
GRPO's advantages, clipped ratio and KL."""

from __future__ import annotations

import math

import pytest
import torch

from interiorfusion_finetune.grpo import clipped_policy_loss, gaussian_kl, group_advantages
from interiorfusion_finetune.sde import gaussian_log_prob, sample_sde, sde_std, step_log_prob
from interiorfusion_structure.flow import sample_ode

T_RANGE = (1.0 / 81.0, 1.0 / 1.001)


def _toy_velocity(weight: torch.Tensor):
    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ weight) * (1.0 + t[0]) - 0.3 * x
    return v


def test_at_noise_zero_it_is_the_ode_sampler() -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 4, generator=g) * 0.5
    x0 = torch.randn(10, 4, generator=g)
    ode = sample_ode(_toy_velocity(weight), x0, 2, 12, T_RANGE, "euler")
    sde = sample_sde(_toy_velocity(weight), x0, torch.tensor([0] * 6 + [1] * 4), 2, 12, T_RANGE, 0.0)
    torch.testing.assert_close(sde.x1, ode, rtol=0, atol=1e-6)
    assert sde.steps == 12 and torch.count_nonzero(sde.log_probs) == 0
    # …and with noise it is not
    noisy = sample_sde(_toy_velocity(weight), x0, torch.tensor([0] * 6 + [1] * 4), 2, 12, T_RANGE, 0.7,
                       torch.Generator().manual_seed(1))
    assert (noisy.x1 - ode).abs().max() > 1e-2


def test_an_sde_window_draws_noise_in_its_first_steps_only() -> None:
    """rl.sde_window: the first steps are the SDE's (with log-probabilities), the rest exactly the ODE's Euler steps
    from wherever the random steps left the state."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 4, generator=g) * 0.5
    x0 = torch.randn(10, 4, generator=g)
    samples = torch.tensor([0] * 6 + [1] * 4)
    traj = sample_sde(_toy_velocity(weight), x0, samples, 2, 8, T_RANGE, 0.7, torch.Generator().manual_seed(1),
                      stochastic=2)
    assert traj.random_steps == 2
    assert bool((traj.log_probs[:2] != 0).all()) and torch.count_nonzero(traj.log_probs[2:]) == 0
    rest = sample_ode(_toy_velocity(weight), traj.states[2], 2, 6, T_RANGE, "euler", grid=traj.grid[2:])
    torch.testing.assert_close(traj.x1, rest, rtol=0, atol=1e-6)
    free = sample_sde(_toy_velocity(weight), x0, samples, 2, 8, T_RANGE, 0.7, torch.Generator().manual_seed(1))
    assert free.random_steps == 8 and (free.x1 - traj.x1).abs().max() > 1e-3


def test_log_probs_are_the_steps_gaussian_densities() -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 3, generator=g) * 0.5
    token_sample = torch.tensor([0, 0, 1, 1, 1])
    traj = sample_sde(_toy_velocity(weight), torch.randn(5, 3, generator=g), token_sample, 2, 6, T_RANGE, 0.7,
                      torch.Generator().manual_seed(3))
    velocity = _toy_velocity(weight)
    for k in range(traj.steps):
        t, t_next = traj.grid[k], traj.grid[k + 1]
        x = traj.states[k].double()
        v = velocity(traj.states[k], torch.full((2,), t)).double()
        mean = x + (v - (0.7**2 / (2 * t)) * (x - t * v)) * (t_next - t)
        std = 0.7 * math.sqrt((1 - t) / t) * math.sqrt(t_next - t)
        direct = torch.distributions.Normal(mean, std).log_prob(traj.states[k + 1].double()).sum(-1)
        want = torch.stack([direct[token_sample == b].sum() for b in range(2)])
        torch.testing.assert_close(traj.log_probs[k].double(), want, rtol=1e-5, atol=1e-3)
        # recomputed by the same policy (the training pass): the same numbers
        torch.testing.assert_close(step_log_prob(velocity, traj, k, token_sample, 2, 0.7), traj.log_probs[k],
                                   rtol=1e-6, atol=1e-4)
    assert traj.log_probs.dtype == torch.float32


@pytest.mark.parametrize("noise_level", [0.0, 0.7, 1.2])
def test_the_sde_keeps_the_flows_marginals(noise_level: float) -> None:
    """Data x1 ~ N(m, s²): the exact velocity E[x1 − x0 | x_t] is known in closed form; sampling it with the SDE
    must land on N(m, s²) whatever the noise level (a wrong drift correction changes the spread)."""
    m, s = 1.5, 0.4

    def exact(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t[0].double()
        var = (1 - tt) ** 2 + tt**2 * s**2
        centred = x.double() - tt * m
        return (m + tt * s**2 / var * centred - (1 - tt) / var * centred).float()

    n = 20000
    g = torch.Generator().manual_seed(0)
    t_range = (0.002, 0.998)
    x0 = torch.randn(n, 1, generator=g) * math.sqrt((1 - t_range[0]) ** 2 + t_range[0] ** 2 * s**2) + t_range[0] * m
    traj = sample_sde(exact, x0, torch.zeros(n, dtype=torch.long), 1, 400, t_range, noise_level,
                      torch.Generator().manual_seed(1))
    assert abs(float(traj.x1.mean()) - m) < 0.02
    assert abs(float(traj.x1.std()) - s) < 0.02


def test_sde_std_follows_flow_grpo_in_this_convention() -> None:
    # Flow-GRPO: a·sqrt(σ / (1 − σ)) with σ = 1 − t (its noise level); ours at t.
    for t in (0.1, 0.5, 0.9):
        sigma = 1 - t
        assert sde_std(t, 0.7) == pytest.approx(0.7 * math.sqrt(sigma / (1 - sigma)))


def test_gaussian_log_prob_sums_per_sample() -> None:
    x = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.5, 0.5]])
    mean = torch.zeros(3, 2)
    got = gaussian_log_prob(x, mean, 0.5, torch.tensor([0, 1, 1]), 2)
    normal = torch.distributions.Normal(0.0, 0.5)
    want = torch.stack([normal.log_prob(x[0]).sum(), normal.log_prob(x[1:]).sum()])
    torch.testing.assert_close(got, want)


def test_advantages_are_normalised_per_group_and_flat_groups_skipped() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5, 0.5, 0.5, 0.5, 10.0, 20.0, 10.0, 20.0])
    groups = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    adv = group_advantages(rewards, groups, "group")
    for g in (0, 2):
        a = adv.values[groups == g]
        assert float(a.mean()) == pytest.approx(0.0, abs=1e-6)
        assert float(a.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    assert torch.count_nonzero(adv.values[groups == 1]) == 0 and not adv.keep[groups == 1].any()
    assert adv.skipped_groups == 1 and adv.keep.sum() == 8
    # batch std: one scale for all groups (the larger-spread group gets larger advantages)
    batch = group_advantages(rewards, groups, "batch")
    assert float(batch.values[groups == 2].abs().max()) > float(batch.values[groups == 0].abs().max())
    assert float(batch.values[groups == 0].mean()) == pytest.approx(0.0, abs=1e-6)


def test_clipped_ratio_and_kl() -> None:
    adv = torch.tensor([1.0, -1.0, 2.0])
    same = torch.tensor([-3.0, -4.0, -5.0])
    loss, clipped = clipped_policy_loss(same, same, adv, 0.2)
    assert float(loss) == pytest.approx(-float(adv.mean())) and float(clipped) == 0.0
    # a ratio of e (far past the clip) on a positive advantage is clipped to 1.2; on a negative one it is not
    loss, clipped = clipped_policy_loss(same + torch.tensor([1.0, 1.0, 0.0]), same, adv, 0.2)
    assert float(loss) == pytest.approx((-1.2 + math.e - 2.0) / 3, rel=1e-5) and float(clipped) == pytest.approx(2 / 3)
    mean = torch.randn(5, 3)
    assert torch.count_nonzero(gaussian_kl(mean, mean, 0.3, torch.tensor([0, 0, 1, 1, 1]), 2)) == 0
    shifted = gaussian_kl(mean + 0.1, mean, 0.5, torch.tensor([0, 0, 1, 1, 1]), 2)
    torch.testing.assert_close(shifted, torch.tensor([6 * 0.01 / 0.5, 9 * 0.01 / 0.5]))


def _toy_grpo(lr: float, iterations: int = 30) -> list[float]:
    """GRPO with this package's SDE, advantages and clipped objective on a toy flow (v = b, a learnable drift;
    reward −‖x̂1 − 2‖²): the mean reward of each iteration's rollouts."""
    from interiorfusion_finetune.sde import step_mean

    bias = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([bias], lr=lr)
    g = torch.Generator().manual_seed(1)
    groups, size, steps, a = 4, 8, 6, 0.7
    n = groups * size
    tokens, dims = torch.arange(n), torch.full((n,), 3.0)
    curve = []
    for _ in range(iterations):
        traj = sample_sde(lambda x, t: x * 0 + bias.detach(), torch.randn(n, 3, generator=g), tokens, n, steps,
                          (0.02, 0.98), a, g)
        reward = -((traj.x1 - 2.0) ** 2).mean(1)
        adv = group_advantages(reward, torch.arange(n) // size)
        loss = torch.zeros(())
        for k in range(steps):
            t, t_next = traj.grid[k], traj.grid[k + 1]
            mean = step_mean(lambda x, t: x * 0 + bias, traj, k, n, a)
            lp = gaussian_log_prob(traj.states[k + 1], mean, sde_std(t, a) * math.sqrt(t_next - t), tokens, n)
            loss = loss + clipped_policy_loss(lp / dims, traj.log_probs[k] / dims, adv.values, 1e-4)[0]
        opt.zero_grad()
        (loss / steps).backward()
        opt.step()
        curve.append(float(reward.mean()))
    return curve


def test_grpo_raises_the_reward_of_a_toy_flow_against_lr_zero() -> None:
    """The objective's sign and scale end to end: the same rollouts' noise, lr 0.05 vs lr 0."""
    tuned, frozen = _toy_grpo(0.05), _toy_grpo(0.0)
    assert tuned[0] == frozen[0]  # the same first rollouts
    assert sum(tuned[-10:]) / 10 > sum(frozen[-10:]) / 10 + 1.0, (tuned, frozen)
