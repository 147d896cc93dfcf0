"""The DiT backbone, packed attention, RoPE, windows and the flow's samplers."""

from __future__ import annotations

import pytest
import torch

from interiorfusion_structure.attention import (
    Rope3D,
    Segments,
    apply_rope,
    varlen_attention,
    window_partition,
)
from interiorfusion_structure.dit import DiT, count_parameters
from interiorfusion_structure.flow import Guidance, guided, interpolate, sample_ode, sample_timesteps

LENGTHS = [5, 9, 3, 9]


def packed(lengths: list[int], heads: int = 2, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, heads, dim, generator=g, dtype=torch.float64) for _ in range(3))
    return q, k, v, Segments.from_lengths(lengths)


def per_sample_attention(q, k, v, segs: Segments) -> torch.Tensor:
    outs = []
    for a, b in zip(segs.offsets[:-1].tolist(), segs.offsets[1:].tolist(), strict=True):
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("backend", ["sdpa", "mask"])
def test_packed_attention_equals_per_sample_attention(backend: str) -> None:
    q, k, v, segs = packed(LENGTHS)
    got = varlen_attention(q, k, v, segs, backend=backend)
    torch.testing.assert_close(got, per_sample_attention(q, k, v, segs))
    # No token sees another sample: perturbing sample 1 leaves samples 0, 2, 3 unchanged.
    k2 = k.clone()
    k2[5:14] += torch.randn(9, *k.shape[1:], dtype=k.dtype)
    other = varlen_attention(q, k2, v, segs, backend=backend)
    keep = torch.ones(len(q), dtype=torch.bool)
    keep[5:14] = False
    torch.testing.assert_close(other[keep], got[keep])
    assert not torch.allclose(other[~keep], got[~keep])


def test_many_lengths_are_padded_per_bucket_and_still_exact() -> None:
    lengths = [1, 2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31]  # more distinct lengths than EXACT_GROUPS
    q, k, v, segs = packed(lengths)
    torch.testing.assert_close(varlen_attention(q, k, v, segs, backend="sdpa"), per_sample_attention(q, k, v, segs))


def test_cross_attention_segments_differ_in_length() -> None:
    q, _, _, qs = packed([4, 6])
    _, k, v, ks = packed([3, 8], seed=1)
    got = varlen_attention(q, k, v, qs, ks, backend="sdpa")
    ref = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1)).transpose(0, 1)
        for (a, b), (c, d) in [((0, 4), (0, 3)), ((4, 10), (3, 11))]])
    torch.testing.assert_close(got, ref)


def test_rope_is_relative() -> None:
    rope = Rope3D(24)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(10, 2, 24, generator=g), torch.randn(10, 2, 24, generator=g)
    coords = torch.randint(0, 32, (10, 3), generator=g)

    def scores(c: torch.Tensor) -> torch.Tensor:
        cos, sin = rope(c)
        return torch.einsum("ihd,jhd->hij", apply_rope(q, cos, sin), apply_rope(k, cos, sin))

    base = scores(coords)
    torch.testing.assert_close(scores(coords + torch.tensor([7, -3, 11])), base, atol=1e-4, rtol=1e-4)
    # ...while moving one token relative to the others does change them (the embedding is not a no-op).
    moved = coords.clone()
    moved[0] += torch.tensor([5, 0, 0])
    assert not torch.allclose(scores(moved), base, atol=1e-3)


def small_dit(**kw) -> DiT:
    torch.manual_seed(0)
    net = DiT(6, 6, width=32, depth=3, heads=4, mlp_hidden=64, cond_width=16, **kw).double()
    for p in net.parameters():  # the zero-initialised layers would hide differences between variants
        torch.nn.init.normal_(p, std=0.2)
    return net


def dit_inputs(lengths: list[int], grid: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    coords = torch.cat([torch.cat([torch.full((n, 1), b), torch.randint(0, grid, (n, 3), generator=g)], 1)
                        for b, n in enumerate(lengths)])
    B = len(lengths)
    return (torch.randn(sum(lengths), 6, generator=g, dtype=torch.float64), coords, Segments.from_lengths(lengths),
            torch.rand(B, generator=g, dtype=torch.float64), torch.randn(3 * B, 16, generator=g, dtype=torch.float64),
            Segments.from_lengths([3] * B), torch.randn(B, 16, generator=g, dtype=torch.float64))


def test_dit_packed_batch_equals_samples_alone() -> None:
    net = small_dit()
    x, coords, segs, t, cond, csegs, pooled = dit_inputs(LENGTHS)
    out = net(x, coords, segs, t, cond, csegs, pooled)
    for b, (a, e) in enumerate(zip(segs.offsets[:-1].tolist(), segs.offsets[1:].tolist(), strict=True)):
        alone = net(x[a:e], coords[a:e], Segments.from_lengths([e - a]), t[b:b + 1], cond[3 * b:3 * b + 3],
                    Segments.from_lengths([3]), pooled[b:b + 1])
        torch.testing.assert_close(out[a:e], alone)


def test_window_covering_everything_equals_full_attention() -> None:
    x, coords, segs, t, cond, csegs, pooled = dit_inputs(LENGTHS, grid=6)
    full = small_dit()(x, coords, segs, t, cond, csegs, pooled)
    window = small_dit(attention="window", window=12)(x, coords, segs, t, cond, csegs, pooled)
    torch.testing.assert_close(window, full)
    small = small_dit(attention="window", window=2)(x, coords, segs, t, cond, csegs, pooled)
    assert not torch.allclose(small, full)


def test_window_partition_groups_cells() -> None:
    coords = torch.tensor([[0, 0, 0, 0], [0, 3, 0, 0], [1, 0, 0, 0], [0, 1, 1, 1], [0, 4, 0, 0]])
    part = window_partition(coords, window=2)
    groups = [sorted(part.order[a:b].tolist()) for a, b in
              zip(part.segments.offsets[:-1].tolist(), part.segments.offsets[1:].tolist(), strict=True)]
    assert sorted(groups) == [[0, 3], [1], [2], [4]]
    assert torch.equal(part.order[part.inverse], torch.arange(5))


def test_gradient_checkpointing_matches() -> None:
    x, coords, segs, t, cond, csegs, pooled = dit_inputs([4, 7])
    grads = []
    for ckpt in (False, True):
        net = small_dit(gradient_checkpointing=ckpt).train()
        net(x, coords, segs, t, cond, csegs, pooled).square().sum().backward()
        grads.append(net.blocks[0].attention.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_lora_target_names_resolve() -> None:
    net = DiT(4, 4, width=16, depth=2, heads=2, mlp_hidden=32, cond_width=8)
    names = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    for target in ("attention.qkv", "attention.proj", "mlp.fc1", "mlp.fc2"):
        # peft's rule for a string entry in target_modules: the module name ends with "." + target.
        hits = [n for n in names if n.endswith("." + target)]
        assert len(hits) == 2, (target, hits)
    assert not any(n.endswith(".attention.proj") for n in names if "cross_attention" in n)


def test_seed_backbone_size_on_meta() -> None:
    with torch.device("meta"):
        net = DiT(64, 64, width=1536, depth=30, heads=12, mlp_hidden=8192, cond_width=1024)
    assert 1.2e9 <= count_parameters(net) <= 1.4e9


def test_samplers_integrate_a_known_linear_flow_exactly() -> None:
    # For one data point x1, the rectified flow's exact velocity is (x1 − x) / (1 − t): constant along each
    # straight path, so Euler and Heun land on x1 from any start, with any number of steps.
    x1 = torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.float64)
    x0 = torch.randn(1, 3, dtype=torch.float64)
    fn = lambda x, t: (x1 - x) / (1 - t[:, None].double())  # noqa: E731
    for method in ("euler", "heun"):
        for steps in (1, 3, 10):
            got = sample_ode(fn, x0, 1, steps, (0.0, 0.9), method)
            torch.testing.assert_close(got, x1)
    # A constant velocity field: x(1) = x0 + v.
    v = torch.tensor([[0.3, 0.1, -0.2]], dtype=torch.float64)
    torch.testing.assert_close(sample_ode(lambda x, t: v, x0, 1, 4, (0.0, 1.0), "heun"), x0 + v)


def test_cfg_scale_one_is_the_conditional_prediction() -> None:
    calls: list[frozenset[str]] = []

    def velocity(x: torch.Tensor, t: torch.Tensor, drop: frozenset[str]) -> torch.Tensor:
        calls.append(drop)
        return x * (2.0 if not drop else 0.5)

    x = torch.randn(4, 3)
    out = guided(velocity, Guidance(1.0, {"image": 1.0}))(x, torch.zeros(1))
    torch.testing.assert_close(out, 2.0 * x)
    assert calls == [frozenset()]  # one network evaluation
    out = guided(velocity, Guidance(3.0))(x, torch.zeros(1))
    torch.testing.assert_close(out, 0.5 * x + 3.0 * (2.0 * x - 0.5 * x))


def test_timestep_law_and_interpolation() -> None:
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(20000, "logit_normal", -1.2, 1.2, (0.01, 0.999), g)
    assert abs(float(t.median()) - torch.sigmoid(torch.tensor(-1.2)).item()) < 0.01  # noisy side: t = 1 is data
    assert float(t.min()) >= 0.01 - 1e-6 and float(t.max()) <= 0.999 + 1e-6
    u = sample_timesteps(20000, "uniform", 0.0, 1.0, (0.0, 1.0), g)
    assert abs(float(u.mean()) - 0.5) < 0.01
    x0, x1 = torch.zeros(2, 3), torch.ones(2, 3)
    torch.testing.assert_close(interpolate(x0, x1, torch.tensor([0.25, 1.0])),
                               torch.tensor([[0.25] * 3, [1.0] * 3]))
