"""Sparse convs vs dense ``F.conv3d`` / ``F.conv_transpose3d`` and across backends: forward and the gradients
of input, weight and bias, in float64, at 1 and 2 torch threads. Every known backend is a parameter: one that does
not import here is reported as skipped with the reason (never silently absent), and the optional backends' parity
test checks that their own kernels ran."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from interiorfusion_core.sparse import (
    SparseConv3d,
    SparseConvTranspose3d,
    SparseTensor,
    SubMConv3d,
    to_dense_conv3d,
    to_dense_conv_transpose3d,
)
from interiorfusion_core.sparse import backend as sparse_backend

BACKENDS = sparse_backend.BACKENDS  # all of them: unusable ones skip, with the reason
OPTIONAL = [b for b in BACKENDS if b != "torch"]
TOL = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    name = request.param
    why = sparse_backend.backend_status()[name]
    if why is not None:
        pytest.skip(f"sparse backend {name} is not usable here: {why}")
    return name


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def random_sparse(shape=(12, 12, 12), batch=2, channels=3, density=0.25, seed=0) -> SparseTensor:
    g = torch.Generator().manual_seed(seed)
    occ = torch.rand(batch, *shape, generator=g) < density
    feats = torch.randn(int(occ.sum()), channels, generator=g, dtype=torch.float64)
    return SparseTensor.from_occupancy(occ, feats)


def at(dense: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Rows of a [B, C, X, Y, Z] grid at [N, 4] coordinates -> [N, C]."""
    b, x, y, z = coords.unbind(1)
    return dense.permute(0, 2, 3, 4, 1)[b, x, y, z]


def grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g)


def reached(occ_dense: torch.Tensor, transposed: bool, k, s, p, output_padding=0) -> torch.Tensor:
    """Output sites a sparse (transposed) conv must produce: where any active input contributes."""
    ones = torch.ones(1, 1, *k, dtype=torch.float64)
    fn = F.conv_transpose3d if transposed else F.conv3d
    extra = {"output_padding": output_padding} if transposed else {}
    hit = fn(occ_dense[:, None].double(), ones, stride=s, padding=p, **extra)[:, 0] > 0
    return hit.nonzero().contiguous()


def check_rows_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("kernel", [3, 5, (3, 1, 5)], ids=["k3", "k5", "k3x1x5"])
def test_submanifold_matches_dense(backend: str, kernel, threads: int) -> None:
    x = random_sparse()
    conv = SubMConv3d(3, 4, kernel, backend=backend).double()
    feats = x.feats.clone().requires_grad_()
    y = conv(x.replace(feats))
    assert torch.equal(y.coords, x.coords)

    w_dense = to_dense_conv3d(conv.weight, conv.kernel_size)
    dense_in = x.replace(feats).dense()
    pad = tuple(k // 2 for k in conv.kernel_size)
    ref = at(F.conv3d(dense_in, w_dense, conv.bias, padding=pad), x.coords)
    check_rows_close(y.feats, ref)

    params = (feats, conv.weight, conv.bias)
    for a, b in zip(grads(y.feats, params), grads(ref, params), strict=True):
        check_rows_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize(
    "k,s,p",
    [(2, 2, 0), (3, 2, 1), (3, 1, 0), ((2, 3, 1), (2, 1, 1), (0, 1, 0))],
    ids=["k2s2", "k3s2p1", "k3s1-valid", "anisotropic"],
)
def test_strided_matches_dense(backend: str, k, s, p, threads: int) -> None:
    x = random_sparse()
    conv = SparseConv3d(3, 4, k, s, p, backend=backend).double()
    feats = x.feats.clone().requires_grad_()
    y = conv(x.replace(feats))

    occ = x.replace(torch.ones(x.num_voxels, 1)).dense()[:, 0] > 0
    expected = reached(occ, False, conv.kernel_size, conv.stride, conv.padding)
    assert torch.equal(y.coords, expected)  # same sites, and sorted (b, x, y, z)
    out_shape = tuple(
        (a + 2 * pp - kk) // ss + 1
        for a, kk, ss, pp in zip(x.spatial_shape, conv.kernel_size, conv.stride, conv.padding, strict=True)
    )
    assert y.spatial_shape == out_shape
    assert y.stride == conv.stride

    dense = F.conv3d(
        x.replace(feats).dense(),
        to_dense_conv3d(conv.weight, conv.kernel_size),
        conv.bias,
        stride=conv.stride,
        padding=conv.padding,
    )
    ref = at(dense, y.coords)
    check_rows_close(y.feats, ref)
    params = (feats, conv.weight, conv.bias)
    for a, b in zip(grads(y.feats, params), grads(ref, params), strict=True):
        check_rows_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1)], ids=["k2s2", "k3s2p1"])
@pytest.mark.parametrize("onto", ["target", "children"])
def test_transposed_matches_dense(backend: str, k, s, p, onto: str, threads: int) -> None:
    fine = random_sparse(channels=4)
    down = SparseConv3d(4, 3, k, s, p, backend=backend).double()
    coarse = down(fine).replace(down(fine).feats.detach())
    up = SparseConvTranspose3d(3, 4, k, s, p, backend=backend).double()
    feats = coarse.feats.clone().requires_grad_()
    src = coarse.replace(feats)
    y = up(src, fine if onto == "target" else None)

    if onto == "target":
        assert torch.equal(y.coords, fine.coords) and y.spatial_shape == fine.spatial_shape
        full = tuple((a - 1) * s - 2 * p + k for a in coarse.spatial_shape)
        output_padding = tuple(f - a for f, a in zip(fine.spatial_shape, full, strict=True))
    else:
        output_padding = 0
        occ = coarse.replace(torch.ones(coarse.num_voxels, 1)).dense()[:, 0] > 0
        expected = reached(occ, True, up.kernel_size, up.stride, up.padding)
        assert torch.equal(y.coords, expected)
    dense = F.conv_transpose3d(
        src.dense(),
        to_dense_conv_transpose3d(up.weight, up.kernel_size),
        up.bias,
        stride=up.stride,
        padding=up.padding,
        output_padding=output_padding,
    )
    ref = at(dense, y.coords)
    check_rows_close(y.feats, ref)
    params = (feats, up.weight, up.bias)
    for a, b in zip(grads(y.feats, params), grads(ref, params), strict=True):
        check_rows_close(a, b)


@pytest.mark.parametrize("backend", OPTIONAL, indirect=True)
def test_backend_matches_torch_float32(backend: str, threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each optional backend against the torch reference on a denser float32 grid (more pairs per offset)."""
    module = getattr(sparse_backend, f"backend_{backend}")
    calls = []
    real = module.sparse_conv

    def counted(*args, **kwargs):
        calls.append(backend)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "sparse_conv", counted)
    x = random_sparse(shape=(16, 16, 16), channels=8, density=0.4, seed=3)
    x = x.replace(x.feats.float())
    torch.manual_seed(0)
    ref_conv = SubMConv3d(8, 16, 3, backend="torch")
    conv = SubMConv3d(8, 16, 3, backend=backend)
    conv.load_state_dict(ref_conv.state_dict())
    f1 = x.feats.clone().requires_grad_()
    f2 = x.feats.clone().requires_grad_()
    y1 = ref_conv(x.replace(f1)).feats
    assert calls == []
    y2 = conv(x.replace(f2)).feats
    assert calls == [backend]  # the backend's own kernels ran, not the torch reference
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)
    g1 = grads(y1, (f1, ref_conv.weight, ref_conv.bias))
    g2 = grads(y2, (f2, conv.weight, conv.bias))
    for a, b in zip(g2, g1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_torch_backend_chunking_is_exact() -> None:
    """Blocked gather/matmul/scatter gives the same numbers whatever the block size."""
    from interiorfusion_core.sparse import backend_torch, submanifold_map

    x = random_sparse()
    kmap = submanifold_map(x, (3, 3, 3))
    w = torch.randn(27, 3, 5, dtype=torch.float64)
    ref = backend_torch.sparse_conv(x.feats, w, None, kmap, chunk=1 << 30)
    for chunk in (1, 7, 64):
        torch.testing.assert_close(backend_torch.sparse_conv(x.feats, w, None, kmap, chunk=chunk), ref, **TOL)


def test_torch_backend_gradcheck() -> None:
    from interiorfusion_core.sparse import backend_torch, strided_map

    x = random_sparse(shape=(5, 5, 5), batch=1, density=0.3, channels=2)
    _, kmap = strided_map(x, (3, 3, 3), (2, 2, 2), (1, 1, 1))
    w = torch.randn(27, 2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    f = x.feats.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda f, w, b: backend_torch.sparse_conv(f, w, b, kmap, chunk=5), (f, w, b)
    )
