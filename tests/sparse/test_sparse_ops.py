"""Space<->channel, pruning, norms, per-voxel layers, neighbour-map caching and the SparseTensor itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from interiorfusion_core.sparse import (
    ChannelToSpace,
    SpaceToChannel,
    SparseConv3d,
    SparseConvTranspose3d,
    SparseGroupNorm,
    SparseLayerNorm,
    SparseLinear,
    SparseReLU,
    SparseTensor,
    SubMConv3d,
    channel_to_space,
    prune,
    space_to_channel,
)
from interiorfusion_core.sparse import maps as sparse_maps


def random_sparse(shape=(12, 12, 12), batch=2, channels=3, density=0.25, seed=0) -> SparseTensor:
    g = torch.Generator().manual_seed(seed)
    occ = torch.rand(batch, *shape, generator=g) < density
    feats = torch.randn(int(occ.sum()), channels, generator=g, dtype=torch.float64)
    return SparseTensor.from_occupancy(occ, feats)


# ---- SparseTensor -----------------------------------------------------------------------------------------
def test_dense_round_trip_and_validation() -> None:
    x = random_sparse()
    back = SparseTensor.from_dense(x.dense())
    assert torch.equal(back.coords, x.coords) and torch.equal(back.feats, x.feats)
    assert x.batch_counts().sum().item() == x.num_voxels
    x.validate()
    with pytest.raises(ValueError, match="outside"):
        SparseTensor(torch.tensor([[0, 12, 0, 0]]), torch.zeros(1, 1), 12, check=True)
    with pytest.raises(ValueError, match="duplicate"):
        SparseTensor(torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]]), torch.zeros(2, 1), 12, check=True)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        SparseTensor(torch.zeros(3, 3, dtype=torch.long), torch.zeros(3, 1), 12)


def test_sorted_orders_lexicographically() -> None:
    x = random_sparse()
    perm = torch.randperm(x.num_voxels, generator=torch.Generator().manual_seed(0))
    shuffled = SparseTensor(x.coords[perm], x.feats[perm], x.spatial_shape, batch_size=2)
    s = shuffled.sorted()
    assert torch.equal(s.coords, x.coords) and torch.equal(s.feats, x.feats)


def test_maps_agree_between_dense_table_and_sorted_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    x = random_sparse()
    a = sparse_maps.build_submanifold_map(x.coords, x.spatial_shape, 2, (3, 3, 3))
    monkeypatch.setattr(sparse_maps, "DENSE_TABLE_MAX_CELLS", 0)
    b = sparse_maps.build_submanifold_map(x.coords, x.spatial_shape, 2, (3, 3, 3))
    assert a.bounds == b.bounds
    assert torch.equal(a.in_idx, b.in_idx) and torch.equal(a.out_idx, b.out_idx)


def test_unsorted_coordinates_give_the_same_conv() -> None:
    x = random_sparse()
    perm = torch.randperm(x.num_voxels, generator=torch.Generator().manual_seed(1))
    shuffled = SparseTensor(x.coords[perm], x.feats[perm], x.spatial_shape, batch_size=2)
    conv = SubMConv3d(3, 4).double()
    torch.testing.assert_close(conv(shuffled).feats, conv(x).feats[perm], rtol=1e-12, atol=1e-12)


# ---- space <-> channel ------------------------------------------------------------------------------------
def test_space_to_channel_layout_against_dense() -> None:
    x = random_sparse(channels=2)
    y, mask = space_to_channel(x)
    assert y.num_channels == 16 and y.spatial_shape == (6, 6, 6) and y.stride == (2, 2, 2)
    dense = x.dense()  # [B, C, 12, 12, 12]
    for slot in range(8):
        dx, dy, dz = slot // 4, (slot // 2) % 2, slot % 2
        child = dense[:, :, dx::2, dy::2, dz::2]
        b, px, py, pz = y.coords.unbind(1)
        expected = child.permute(0, 2, 3, 4, 1)[b, px, py, pz]
        torch.testing.assert_close(y.feats[:, slot * 2 : slot * 2 + 2], expected)
        occ_child = (dense != 0).any(1)[:, dx::2, dy::2, dz::2][b, px, py, pz]
        assert torch.equal(mask[:, slot], occ_child)
    # parents are exactly the cells with at least one child
    assert bool(mask.any(1).all())


def test_space_channel_round_trips() -> None:
    x = random_sparse(channels=3)
    y, mask = space_to_channel(x)
    back = channel_to_space(y, mask)  # pruned by the mask: exactly the original voxels (parent-major order)
    assert back.num_voxels == x.num_voxels
    back_sorted = back.sorted()
    assert torch.equal(back_sorted.coords, x.coords) and torch.equal(back_sorted.feats, x.feats)
    assert back.spatial_shape == x.spatial_shape and back.stride == (1, 1, 1)
    onto = channel_to_space(y, target=x)  # onto the original coordinates (reuses the cached map)
    assert torch.equal(onto.feats, x.feats) and onto.cache is x.cache
    full = channel_to_space(y)  # all 8 children: zeros where nothing was
    assert full.num_voxels == 8 * y.num_voxels
    keep = (full.feats != 0).any(1)
    kept = prune(full, keep).sorted()
    assert torch.equal(kept.coords, x.coords[(x.feats != 0).any(1)])
    # and the other direction: channel_to_space then space_to_channel gives back the parents' channels
    z, _ = space_to_channel(full)
    assert torch.equal(z.coords, y.coords) and torch.equal(z.feats, y.feats)


def test_space_channel_modules_and_odd_grid() -> None:
    x = random_sparse()
    s2c = SpaceToChannel(keep_mask=True)
    y = s2c(x)
    assert s2c.last_child_mask is not None and s2c.last_child_mask.shape == (y.num_voxels, 8)
    back = ChannelToSpace()(y, s2c.last_child_mask).sorted()
    assert torch.equal(back.feats, x.feats)
    odd = random_sparse(shape=(5, 6, 6))
    with pytest.raises(ValueError, match="even grid"):
        space_to_channel(odd)


def test_space_to_channel_gradients() -> None:
    x = random_sparse(channels=2)
    f = x.feats.clone().requires_grad_()
    y, mask = space_to_channel(x.replace(f))
    out = channel_to_space(y, mask)
    (g,) = torch.autograd.grad((out.feats * 3).sum(), f)
    torch.testing.assert_close(g, torch.full_like(f, 3.0))


# ---- pruning ----------------------------------------------------------------------------------------------
def test_prune_keeps_rows_in_order_and_new_cache() -> None:
    x = random_sparse()
    keep = x.feats[:, 0] > 0
    y = prune(x, keep)
    assert torch.equal(y.coords, x.coords[keep]) and torch.equal(y.feats, x.feats[keep])
    assert y.cache is not x.cache
    assert prune(x, torch.ones(x.num_voxels, dtype=torch.bool)) is x
    with pytest.raises(ValueError, match="prune mask"):
        prune(x, keep.float())
    # a conv after pruning sees only the kept voxels (same as convolving the pruned dense grid)
    conv = SubMConv3d(3, 2).double()
    dense = prune(x, keep).dense()
    from interiorfusion_core.sparse import to_dense_conv3d

    ref = F.conv3d(dense, to_dense_conv3d(conv.weight, (3, 3, 3)), conv.bias, padding=1)
    b, i, j, k = y.coords.unbind(1)
    torch.testing.assert_close(conv(y).feats, ref.permute(0, 2, 3, 4, 1)[b, i, j, k])


# ---- norms and per-voxel layers ---------------------------------------------------------------------------
def test_group_norm_is_per_sample() -> None:
    x = random_sparse(channels=8)
    norm = SparseGroupNorm(4, 8).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    f = x.feats.clone().requires_grad_()
    y = norm(x.replace(f)).feats
    refs = []
    for b in range(x.batch_size):
        rows = x.coords[:, 0] == b
        sample = f[rows].t()[None]  # [1, C, N_b]: a dense sample whose spatial extent is its voxels
        refs.append((rows, F.group_norm(sample, 4, norm.weight, norm.bias, norm.eps)[0].t()))
    ref = torch.zeros_like(y)
    for rows, r in refs:
        ref = ref.index_put((rows.nonzero().squeeze(1),), r)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    a = torch.autograd.grad(y, (f, norm.weight, norm.bias), g)
    b_ = torch.autograd.grad(ref, (f, norm.weight, norm.bias), g)
    for u, v in zip(a, b_, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)
    # scaling one sample does not change the other's output (statistics do not leak across the batch)
    scaled = x.feats.clone()
    scaled[x.coords[:, 0] == 0] *= 10
    y2 = norm(x.replace(scaled)).feats
    other = x.coords[:, 0] == 1
    torch.testing.assert_close(y2[other], y.detach()[other])


def test_layer_norms() -> None:
    x = random_sparse(channels=6)
    ln = SparseLayerNorm(6).double()
    per_sample = ln(x).feats
    for b in range(2):
        rows = x.coords[:, 0] == b
        ref = F.group_norm(x.feats[rows].t()[None], 1, ln.weight, ln.bias, ln.eps)[0].t()
        torch.testing.assert_close(per_sample[rows], ref)
    lv = SparseLayerNorm(6, per_voxel=True).double()
    torch.testing.assert_close(lv(x).feats, F.layer_norm(x.feats, (6,), lv.weight, lv.bias))


def test_linear_and_activation_keep_coordinates_and_cache() -> None:
    x = random_sparse()
    lin = SparseLinear(3, 5).double()
    y = SparseReLU()(lin(x))
    assert y.cache is x.cache and torch.equal(y.coords, x.coords)
    torch.testing.assert_close(y.feats, torch.relu(x.feats @ lin.weight.t() + lin.bias))


# ---- neighbour-map cache ----------------------------------------------------------------------------------
def test_cache_hits_across_a_unet() -> None:
    x = random_sparse(channels=4)
    c1, c2 = SubMConv3d(4, 4), SubMConv3d(4, 4)
    down, up = SparseConv3d(4, 8), SparseConvTranspose3d(8, 4)
    c3 = SubMConv3d(8, 8)
    x = x.replace(x.feats.float())

    h = c1(x)
    assert x.cache.misses == 1 and x.cache.hits == 0
    h = c2(h)  # same coordinates: the submanifold map is reused
    assert x.cache.hits == 1 and len(x.cache) == 1
    coarse = down(h)
    coarse = c3(coarse)
    coarse = c3(coarse)
    assert coarse.cache.hits == 1  # second c3
    # decoder: transposed conv back onto the encoder level hits the map the downsample registered
    misses_before = coarse.cache.misses
    hits_before = coarse.cache.hits
    out = up(coarse, target=h)
    assert coarse.cache.hits == hits_before + 1 and coarse.cache.misses == misses_before
    assert out.cache is x.cache and torch.equal(out.coords, x.coords)
    # the reused map is the exact reverse of the downsample map
    (level, kmap) = x.cache.get(("down", (2, 2, 2), (2, 2, 2), (0, 0, 0)))
    up_map = coarse.cache.get(("up", (2, 2, 2), (2, 2, 2), (0, 0, 0), x.cache.serial))
    assert up_map is kmap.transpose() and level.cache is coarse.cache
    # downsampling the same coordinates twice gives the same coarse coordinate set (one cache)
    again = down(h)
    assert again.cache is coarse.cache


def test_generated_children_know_their_parents() -> None:
    x = random_sparse(channels=4)
    x = x.replace(x.feats.float())
    up = SparseConvTranspose3d(4, 4)
    fine = up(x)
    entry = fine.cache.get(("down", (2, 2, 2), (2, 2, 2), (0, 0, 0)))
    assert entry is not None and entry[0].cache is x.cache
    down = SparseConv3d(4, 4)
    back = down(fine)
    assert back.cache is x.cache and torch.equal(back.coords, x.coords)
    # and the cached reverse map computes what a fresh map would
    fresh = SparseConv3d(4, 4)
    fresh.load_state_dict(down.state_dict())
    uncached = SparseTensor(fine.coords, fine.feats, fine.spatial_shape, fine.stride, fine.batch_size)
    torch.testing.assert_close(fresh(uncached).feats, back.feats)


def test_empty_tensor_and_empty_sample() -> None:
    empty = SparseTensor(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 3), 8, batch_size=2)
    y = SubMConv3d(3, 4)(empty)
    d = SparseConv3d(3, 4)(empty)
    u = SparseConvTranspose3d(4, 4)(d, target=y)
    (y.feats.sum() + u.feats.sum()).backward()
    assert y.num_voxels == d.num_voxels == u.num_voxels == 0 and d.spatial_shape == (4, 4, 4)
    # sample 0 has no voxels: its statistics must not produce NaNs anywhere
    occ = torch.zeros(2, 8, 8, 8, dtype=torch.bool)
    occ[1, 2:5, 3, 4] = True
    x = SparseTensor.from_occupancy(occ, torch.randn(3, 4, dtype=torch.float64, requires_grad=True))
    out = SparseGroupNorm(2, 4).double()(x).feats
    out.sum().backward()
    assert torch.isfinite(out).all()
