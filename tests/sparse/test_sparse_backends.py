"""Backend selection, weight-layout conversions, and spconv / MinkowskiEngine against the torch reference
(including spconv's own map builder on its own [b, z, y, x] convention, with weights from `to_spconv`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from interiorfusion_core.sparse import (
    ENV_VAR,
    SparseConv3d,
    SparseTensor,
    SubMConv3d,
    backend_status,
    coords_to_spconv,
    default_backend,
    from_dense_conv3d,
    from_dense_conv_transpose3d,
    from_minkowski,
    from_spconv,
    resolve_backend,
    to_dense_conv3d,
    to_dense_conv_transpose3d,
    to_minkowski,
    to_spconv,
)
from interiorfusion_core.sparse import backend_spconv as bspconv

HAS_SPCONV = bspconv.available()
HAS_MINKOWSKI = backend_status()["minkowski"] is None
needs_spconv = pytest.mark.skipif(not HAS_SPCONV, reason=f"spconv not importable: {bspconv.import_error()}")


def random_sparse(shape=(12, 12, 12), batch=2, channels=3, density=0.25, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    occ = torch.rand(batch, *shape, generator=g) < density
    feats = torch.randn(int(occ.sum()), channels, generator=g, dtype=dtype)
    return SparseTensor.from_occupancy(occ, feats)


# ---- selection --------------------------------------------------------------------------------------------
def test_resolution_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend(None, "cpu") == "torch"
    assert default_backend("cpu") == "torch"
    assert default_backend("cuda") == ("spconv" if HAS_SPCONV else "torch")
    monkeypatch.setenv(ENV_VAR, "auto")
    assert resolve_backend(None, "cpu") == "torch"
    if HAS_SPCONV:
        monkeypatch.setenv(ENV_VAR, "spconv")
        assert resolve_backend(None, "cpu") == "spconv"
        assert resolve_backend("torch", "cpu") == "torch"  # an explicit argument beats the environment
    monkeypatch.setenv(ENV_VAR, "cuDNN")
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_backend(None, "cpu")


def test_env_var_switches_a_module(monkeypatch: pytest.MonkeyPatch) -> None:
    x = random_sparse()
    conv = SubMConv3d(3, 4).double()
    monkeypatch.setenv(ENV_VAR, "torch")
    ref = conv(x).feats
    if HAS_SPCONV:
        monkeypatch.setenv(ENV_VAR, "spconv")
        torch.testing.assert_close(conv(x).feats, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(HAS_MINKOWSKI, reason="MinkowskiEngine is installed here")
def test_unavailable_backend_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match=r"'minkowski'.*not usable"):
        resolve_backend("minkowski", "cpu")
    conv = SubMConv3d(3, 4, backend="minkowski").double()
    with pytest.raises(RuntimeError, match="not usable"):
        conv(random_sparse())


# ---- layouts ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ks", [(3, 3, 3), (2, 3, 4)])
def test_layout_round_trips(ks) -> None:
    k = ks[0] * ks[1] * ks[2]
    w = torch.randn(k, 5, 7)
    assert torch.equal(from_dense_conv3d(to_dense_conv3d(w, ks)), w)
    assert torch.equal(from_dense_conv_transpose3d(to_dense_conv_transpose3d(w, ks)), w)
    assert torch.equal(from_spconv(to_spconv(w, ks)), w)
    assert torch.equal(from_minkowski(to_minkowski(w, ks), ks), w)
    assert to_spconv(w, ks).shape == (7, ks[2], ks[1], ks[0], 5)
    assert to_dense_conv3d(w, ks).shape == (7, 5, *ks)


def test_canonical_offset_order() -> None:
    """k = (ix*ky + iy)*kz + iz: a one-hot weight at k reads the input at u + (ix, iy, iz) - centre."""
    x = random_sparse(channels=1)
    conv = SubMConv3d(1, 1, 3, bias=False).double()
    for k, delta in [
        (0, (-1, -1, -1)),
        (1, (-1, -1, 0)),
        (3, (-1, 0, -1)),
        (9, (0, -1, -1)),
        (23, (1, 0, 1)),
        (25, (1, 1, 0)),
    ]:
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[k] = 1
        dense = x.dense()[:, 0]
        shifted = torch.zeros_like(dense)
        src = [slice(max(d, 0), 12 + min(d, 0)) for d in delta]
        dst = [slice(max(-d, 0), 12 + min(-d, 0)) for d in delta]
        shifted[:, dst[0], dst[1], dst[2]] = dense[:, src[0], src[1], src[2]]  # shifted[u] = dense[u + d]
        b, i, j, l_ = x.coords.unbind(1)
        torch.testing.assert_close(conv(x).feats[:, 0], shifted[b, i, j, l_])


def test_minkowski_order_is_first_axis_fastest() -> None:
    """ME kernel index m = ix + kx*(iy + ky*iz); check `to_minkowski` against that enumeration."""
    ks = (2, 3, 4)
    w = torch.randn(24, 2, 3)
    me = to_minkowski(w, ks)
    for m in range(24):
        ix, iy, iz = m % 2, (m // 2) % 3, m // 6
        assert torch.equal(me[m], w[(ix * 3 + iy) * 4 + iz])


# ---- spconv -----------------------------------------------------------------------------------------------
@needs_spconv
def test_guard_restores_threads_and_stream_getter() -> None:
    from spconv.pytorch import ops

    before_fn = ops.get_current_stream
    torch.set_num_threads(2)
    try:
        with bspconv.cpu_guard(torch.device("cpu")):
            assert torch.get_num_threads() == 1
            assert ops.get_current_stream() == 0
        assert torch.get_num_threads() == 2 and ops.get_current_stream is before_fn
        with pytest.raises(KeyError), bspconv.cpu_guard(torch.device("cpu")):
            raise KeyError("boom")
        assert torch.get_num_threads() == 2 and ops.get_current_stream is before_fn
    finally:
        torch.set_num_threads(2)


@needs_spconv
@pytest.mark.parametrize("threads", [1, 2])
def test_spconv_native_modules_match_torch_with_converted_weights(threads: int) -> None:
    """spconv's own modules and map builder, on [b, z, y, x] indices, with `to_spconv` weights."""
    import spconv.pytorch as spconv

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = random_sparse(channels=3)
        ours = SubMConv3d(3, 4, 3, backend="torch").double()
        theirs = spconv.SubMConv3d(3, 4, 3, bias=True).double()
        down = SparseConv3d(3, 4, 2, 2, backend="torch").double()
        theirs_down = spconv.SparseConv3d(3, 4, 2, 2, bias=True).double()
        with torch.no_grad():
            theirs.weight.copy_(to_spconv(ours.weight, (3, 3, 3)))
            theirs.bias.copy_(ours.bias)
            theirs_down.weight.copy_(to_spconv(down.weight, (2, 2, 2)))
            theirs_down.bias.copy_(down.bias)
        zyx = tuple(reversed(x.spatial_shape))
        f = x.feats.clone().requires_grad_()
        with bspconv.cpu_guard(torch.device("cpu")):  # spconv's own modules need the same guard on CPU
            st = spconv.SparseConvTensor(f, coords_to_spconv(x.coords), list(zyx), x.batch_size)
            y = theirs(st)
            yd = theirs_down(st)
            (g_sp,) = torch.autograd.grad((y.features**2).sum() + yd.features.sum(), f)
        assert torch.equal(y.indices.long(), coords_to_spconv(x.coords).long())
        torch.testing.assert_close(y.features, ours(x).feats, rtol=1e-10, atol=1e-10)

        ref_down = down(x)
        idx = yd.indices.long()[:, [0, 3, 2, 1]]  # back to [b, x, y, z]
        theirs_sorted = SparseTensor(idx, yd.features.detach(), ref_down.spatial_shape).sorted()
        assert torch.equal(theirs_sorted.coords, ref_down.coords)
        torch.testing.assert_close(theirs_sorted.feats, ref_down.feats, rtol=1e-10, atol=1e-10)

        f2 = x.feats.clone().requires_grad_()
        (g_ref,) = torch.autograd.grad(
            (ours(x.replace(f2)).feats ** 2).sum() + down(x.replace(f2)).feats.sum(), f2
        )
        torch.testing.assert_close(g_sp, g_ref, rtol=1e-10, atol=1e-10)
    finally:
        torch.set_num_threads(before)


@needs_spconv
def test_spconv_layout_matches_dense_conv() -> None:
    """`to_spconv` is what spconv expects: spconv's module == F.conv3d with the dense weight."""
    import spconv.pytorch as spconv

    x = random_sparse(channels=2)
    w = torch.randn(27, 2, 3, dtype=torch.float64)
    m = spconv.SubMConv3d(2, 3, 3, bias=False).double()
    with torch.no_grad():
        m.weight.copy_(to_spconv(w, (3, 3, 3)))
    with bspconv.cpu_guard(torch.device("cpu")):
        st = spconv.SparseConvTensor(x.feats, coords_to_spconv(x.coords), [12, 12, 12], 2)
        y = m(st).features
    ref = F.conv3d(x.dense(), to_dense_conv3d(w, (3, 3, 3)), padding=1)
    b, i, j, k = x.coords.unbind(1)
    torch.testing.assert_close(y, ref.permute(0, 2, 3, 4, 1)[b, i, j, k], rtol=1e-10, atol=1e-10)


def test_coords_to_spconv_is_contiguous_int32() -> None:
    occ = torch.rand(2, 5, 5, 5) < 0.5
    raw = occ.nonzero()  # column-major in recent torch: what spconv silently misreads
    c = coords_to_spconv(raw)
    assert c.is_contiguous() and c.dtype == torch.int32
    assert torch.equal(c.long(), raw[:, [0, 3, 2, 1]])


# ---- MinkowskiEngine --------------------------------------------------------------------------------------
@pytest.mark.skipif(
    not HAS_MINKOWSKI, reason="MinkowskiEngine not installed (source build, see docs/sparse.md)"
)
def test_minkowski_matches_torch() -> None:
    x = random_sparse(dtype=torch.float32)
    torch.manual_seed(0)
    ref = SubMConv3d(3, 4, backend="torch")
    me = SubMConv3d(3, 4, backend="minkowski")
    me.load_state_dict(ref.state_dict())
    torch.testing.assert_close(me(x).feats, ref(x).feats, rtol=1e-5, atol=1e-5)
    down_ref = SparseConv3d(3, 4, backend="torch")
    down_me = SparseConv3d(3, 4, backend="minkowski")
    down_me.load_state_dict(down_ref.state_dict())
    torch.testing.assert_close(down_me(x).feats, down_ref(x).feats, rtol=1e-5, atol=1e-5)
