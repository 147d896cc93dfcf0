"""The VAE network: 16× compression, teacher-forced structure, pruning targets, and that its losses learn."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from interiorfusion_core.sparse import SparseTensor
from interiorfusion_vae.model import SLATInteriorVAE, child_targets, lookup_rows


def _room(n: int = 32) -> SparseTensor:
    g = torch.zeros(n, n, n, dtype=torch.bool)
    lo, hi = 2, n - 2
    g[lo:hi, lo:hi, lo] = g[lo:hi, lo:hi, hi - 1] = True  # floor, ceiling
    g[lo, lo:hi, lo:hi] = g[hi - 1, lo:hi, lo:hi] = g[lo:hi, lo, lo:hi] = True  # three walls
    g[10:15, 10:15, lo + 1 : lo + 6] = True  # a block of furniture
    return SparseTensor.from_occupancy(torch.stack([g, g.flip(0)]))


def _model() -> SLATInteriorVAE:
    torch.manual_seed(0)
    return SLATInteriorVAE(latent_dim=4, channels=[8, 8, 16, 16, 16], blocks_per_level=1, backend="torch")


def test_lookup_rows() -> None:
    table = torch.tensor([[0, 1, 2, 3], [1, 1, 2, 3], [0, 0, 0, 0]])
    query = torch.tensor([[1, 1, 2, 3], [0, 9, 9, 9], [0, 0, 0, 0]])
    assert lookup_rows(query, table).tolist() == [1, -1, 2]


def test_lookup_rows_matches_a_dictionary_for_unsorted_queries_with_repeats_and_misses() -> None:
    g = torch.Generator().manual_seed(0)
    table = torch.unique(torch.randint(0, 12, (400, 4), generator=g), dim=0)
    table = table[torch.randperm(len(table), generator=g)]
    query = torch.cat([table[torch.randint(0, len(table), (300,), generator=g)],
                       torch.randint(0, 14, (300, 4), generator=g)])[torch.randperm(600, generator=g)]
    where = {tuple(c): i for i, c in enumerate(table.tolist())}
    assert lookup_rows(query, table).tolist() == [where.get(tuple(c), -1) for c in query.tolist()]
    assert lookup_rows(query[:0], table).tolist() == []


def test_sixteen_fold_compression_and_latent_coordinates() -> None:
    occ = _room()
    material = torch.rand(len(occ), 8)
    enc = _model().encode(occ, material)
    mu = enc["mu"]
    assert mu.spatial_shape == (2, 2, 2)
    assert mu.feats.shape[1] == 2 * 4  # geometry | material latents
    expected = torch.unique(torch.cat([occ.coords[:, :1], occ.coords[:, 1:] // 16], 1), dim=0)
    assert torch.equal(torch.unique(mu.coords, dim=0), expected)
    # The subdivision: 4 levels, coarse → fine, whose masks count exactly the occupied children.
    counts = [int(mask.sum()) for _, mask in enc["structure"]]
    assert counts[-1] == len(occ)
    assert len(counts) == 4 and counts == sorted(counts)


def test_teacher_forced_decode_covers_the_truth_exactly_once() -> None:
    occ = _room()
    model = _model()
    enc, out = model(occ, torch.rand(len(occ), 8))
    assert out.voxels.spatial_shape == (32, 32, 32)
    # The last level decodes all 8 children of every true parent: the truth is among them, each voxel once.
    rows = lookup_rows(occ.coords, out.voxels.coords)
    assert (rows >= 0).all() and len(torch.unique(rows)) == len(occ)
    assert len(out.voxels) == 8 * len(enc["structure"][-1][0])
    assert out.material.shape == (len(out.voxels), 8)
    assert torch.allclose(out.material[:, 5:8].norm(dim=1), torch.ones(len(out.voxels)), atol=1e-4)
    # Pruning targets of the coarsest head equal the encoder's own mask.
    coords, mask = enc["structure"][0]
    assert torch.equal(child_targets(out.parents[0], coords, mask).sum(), mask.sum())


def _children(parents: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Coordinates of the kept children, parent-major: child j of p sits at 2p + (j // 4, j // 2 % 2, j % 2)."""
    p, j = keep.nonzero(as_tuple=True)
    offset = torch.stack([j // 4, j // 2 % 2, j % 2], 1)
    coords = parents.index_select(0, p)
    return torch.cat([coords[:, :1], coords[:, 1:] * 2 + offset], 1)


def _rows(coords: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(r) for r in coords.tolist()}


def test_free_decode_prunes_by_its_own_logits() -> None:
    occ = _room()
    model = _model().eval()
    with torch.no_grad():
        enc = model.encode(occ, torch.rand(len(occ), 8))
        out = model.decode(enc["mu"])
    assert len(out.parents) == 4 and out.voxels.spatial_shape == (32, 32, 32)
    # Every level below the last keeps exactly the children with logit > 0 (the best one if none is positive) …
    pruned = 0
    for i in range(len(out.parents) - 1):
        logits = out.child_logits[i]
        keep = logits > 0 if bool((logits > 0).any()) else logits == logits.max()
        pruned += int((~keep).sum())
        assert _rows(out.parents[i + 1].coords) == _rows(_children(out.parents[i].coords, keep)), f"level {i}"
        assert len(out.parents[i + 1]) == int(keep.sum())
    assert pruned > 0  # the logits did prune something (the check above is not all-or-nothing)
    # … and the last one decodes all 8 children of every voxel, in the order of its occupancy logits.
    last = out.parents[-1]
    assert torch.equal(out.voxels.coords, _children(last.coords, torch.ones(len(last), 8, dtype=torch.bool)))
    assert torch.equal(out.occupancy_logits, out.child_logits[-1].reshape(-1))


@pytest.mark.parametrize("steps", [25])
def test_losses_fall_on_one_scene(steps: int) -> None:
    from types import SimpleNamespace

    from interiorfusion_vae.config import VAELossConfig
    from interiorfusion_vae.losses import vae_losses

    occ = _room()
    material = torch.rand(len(occ), 8)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    cfg = VAELossConfig()
    batch = SimpleNamespace()  # no views: the render terms are covered in test_vae_render
    history = []
    for _ in range(steps):
        enc, out = model(occ, material)
        terms = vae_losses(enc, out, occ, material, vars(batch), cfg, "mean", render_views=0)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        history.append({k: float(v) for k, v in terms.items()})
    first, last = history[0], history[-1]
    assert last["loss"] < 0.7 * first["loss"]
    assert last["pruning"] < 0.7 * first["pruning"]
    assert last["reconstruction"] < first["reconstruction"]


def test_material_term_skips_samples_without_measured_materials() -> None:
    """Real scans store filler albedo/metallic/roughness: the loss must not train towards it (normals still count)."""
    from interiorfusion_vae.config import VAELossConfig
    from interiorfusion_vae.losses import vae_losses

    occ = _room()
    material = torch.rand(len(occ), 8)
    model = _model()
    with torch.no_grad():
        enc, out = model(occ, material)
    second = occ.coords[:, 0] == 1
    changed = material.clone()
    changed[second, :5] = torch.rand(int(second.sum()), 5)  # other filler PBR values for sample 1
    changed_normals = material.clone()
    changed_normals[second, 5:] = torch.rand(int(second.sum()), 3)

    def term(mat: torch.Tensor, has: list[bool] | None) -> dict[str, torch.Tensor]:
        batch = {} if has is None else {"has_materials": torch.tensor(has)}
        return vae_losses(enc, out, occ, mat, batch, VAELossConfig(), "mean", render_views=0)

    real = [True, False]
    assert torch.equal(term(material, real)["material_l1"], term(changed, real)["material_l1"])
    assert not torch.equal(term(material, real)["material_l1"], term(changed_normals, real)["material_l1"])
    assert not torch.equal(term(material, None)["material_l1"], term(changed, None)["material_l1"])
    assert float(term(material, real)["samples_without_materials"]) == 1.0


def _labelled_model() -> SLATInteriorVAE:
    torch.manual_seed(0)
    return SLATInteriorVAE(latent_dim=4, channels=[8, 8, 16, 16, 16], blocks_per_level=1, backend="torch",
                           num_classes=5)


def test_geometry_outputs_do_not_depend_on_the_material_latent() -> None:
    """Occupancy, pruning and classes read only the geometry half: bit-identical whatever the material half holds."""
    occ = _room()
    model = _labelled_model().eval()
    with torch.no_grad():
        mu = model.encode(occ, torch.rand(len(occ), 8))["mu"]
        outs = []
        for fill in (mu.feats[:, 4:], torch.zeros_like(mu.feats[:, 4:]), 100 * torch.randn_like(mu.feats[:, 4:])):
            outs.append(model.decode(mu.replace(torch.cat([mu.feats[:, :4], fill], 1))))
        alone = model.decode_geometry(mu.replace(mu.feats[:, :4]))
    for out in outs[1:]:
        assert torch.equal(out.voxels.coords, outs[0].voxels.coords)
        assert torch.equal(out.occupancy_logits, outs[0].occupancy_logits)
        assert torch.equal(out.class_logits, outs[0].class_logits)
        assert all(torch.equal(a, b) for a, b in zip(out.child_logits, outs[0].child_logits, strict=True))
        assert not torch.equal(out.material, outs[0].material)  # … while the material half is read
    assert torch.equal(alone.occupancy_logits, outs[0].occupancy_logits)
    assert torch.equal(alone.voxels.coords, outs[0].voxels.coords)
    with pytest.raises(ValueError, match="geometry channels"):
        model.decode_geometry(mu)


def test_pruning_trains_on_its_own_false_proposals() -> None:
    from interiorfusion_vae.model import union_with_proposals

    truth = torch.tensor([[True, False, False, False, False, False, False, False]] * 2)
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, -1.0, -1.0, -1.0, -1.0]] * 2)
    kept = union_with_proposals(truth, logits, ratio=1.0)
    assert (kept & truth).sum() == truth.sum()  # every true child stays
    assert int((kept & ~truth).sum()) == 2  # at most ratio × true count of false proposals, highest logits first
    assert kept[:, 1].all() and not kept[:, 2].any()
    assert torch.equal(union_with_proposals(truth, logits, ratio=0.0), truth)

    occ = _room()
    model = _labelled_model()
    enc, forced = model(occ, torch.rand(len(occ), 8))
    _, joined = model(occ, torch.rand(len(occ), 8), proposals=1.0)
    # An untrained head proposes false children: the joined decode sees more parents, and those false parents'
    # pruning targets are all "no child".
    assert len(joined.parents[1]) > len(forced.parents[1])
    coords, mask = enc["structure"][1]
    targets = child_targets(joined.parents[1], coords, mask)
    false_parents = lookup_rows(joined.parents[1].coords, coords) < 0
    assert false_parents.any() and not targets[false_parents].any()
    rows = lookup_rows(occ.coords, joined.voxels.coords)
    assert (rows >= 0).all()  # teacher forcing still covers the whole truth


def test_semantic_term_learns_the_classes() -> None:
    from interiorfusion_vae.config import VAELossConfig
    from interiorfusion_vae.losses import vae_losses

    occ = _room()
    material = torch.rand(len(occ), 8)
    labels = (occ.coords[:, 3] < 4).long() + 1  # floor-ish slab vs the rest
    model = _labelled_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = {"labels": labels, "has_labels": torch.tensor([True, True])}
    history = []
    for _ in range(30):
        enc, out = model(occ, material)
        terms = vae_losses(enc, out, occ, material, batch, VAELossConfig(), "mean", render_views=0)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        history.append(float(terms["semantic"]))
    # Below the class prior's entropy: the classes are read from the geometry, not only their frequencies.
    p = torch.bincount(labels).float()
    p = p[p > 0] / p.sum()
    assert history[-1] < 0.7 * float(-(p * p.log()).sum()), history
    # Unlabelled samples are skipped: with no labelled sample the term is zero.
    with torch.no_grad():
        enc, out = model(occ, material)
        none = vae_losses(enc, out, occ, material, {"labels": labels, "has_labels": torch.tensor([False, False])},
                          VAELossConfig(), "mean", render_views=0)
    assert float(none["semantic"]) == 0.0


def test_geometry_dropout_makes_the_material_branch_decode_from_its_latent_alone() -> None:
    """In training, a dropped sample's materials depend on the material latent only (its geometry half and the
    geometry features are zeroed); in eval every sample reads both."""
    occ = _room()
    torch.manual_seed(0)
    model = SLATInteriorVAE(latent_dim=4, channels=[8, 8, 16, 16, 16], blocks_per_level=1, backend="torch",
                            material_geometry_dropout=1.0)
    with torch.no_grad():
        mu = model.encode(occ, torch.rand(len(occ), 8))["mu"]
        geo = model.decoder.geometry(mu.replace(mu.feats[:, :4]))
        other_geo = mu.replace(torch.cat([mu.feats[:, :4] + 1.0, mu.feats[:, 4:]], 1))
        # The same subdivision with other geometry features.
        scaled = dataclasses.replace(geo, parents=[p.replace(p.feats * 3) for p in geo.parents],
                                     voxels=geo.voxels.replace(geo.voxels.feats * 3))
        branch = model.decoder.material.train()
        assert torch.equal(branch(mu, geo), branch(other_geo, scaled))  # no geometry input reaches it
        branch.eval()
        assert not torch.equal(branch(mu, geo), branch(other_geo, geo))
        assert not torch.equal(branch(mu, geo), branch(mu, scaled))
