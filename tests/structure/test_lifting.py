"""The condition depth lifted into the latent grid: surface cells where the depth lands, free cells along the rays,
nothing without depth; and the per-token values line up with the flows' token orders."""

from __future__ import annotations

import torch

from interiorfusion_structure.lifting import cell_values, lift_depth, patch_values
from interiorfusion_structure.model import patchify


def wall_view(distance: float = 3.0, size: int = 32):
    """A camera at (4, 1, 1.5) in an 8 m frame looking along +y at a flat wall `distance` metres away."""
    K = torch.tensor([[size / 2, 0, size / 2], [0, size / 2, size / 2], [0, 0, 1.0]])
    # OpenCV camera (x right, y down, z forward) → world: x → x, y → −z, z → +y.
    pose = torch.eye(4)
    pose[:3, :3] = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])
    pose[:3, 3] = torch.tensor([4.0, 1.0, 1.5])
    depth = torch.full((1, size, size), distance)
    return depth, K[None], pose[None], torch.zeros(1, 3), torch.tensor([8.0])


def test_a_wall_lifts_to_surface_cells_behind_free_space() -> None:
    depth, K, pose, origin, cube = wall_view()
    grid = lift_depth(depth, K, pose, origin, cube, 8)  # 1 m cells
    surface, free = grid[0, ..., 0], grid[0, ..., 1]
    ys_surface = torch.nonzero(surface)[:, 1].unique().tolist()
    assert ys_surface == [4]  # the wall at y = 1 + 3 = 4 m
    assert bool(free[4, 1:4, 1].all())  # the ray straight ahead crosses y = 1..3 m before the wall
    assert not bool((surface * free).any())
    assert not bool(free[:, 5:].any())  # nothing behind the wall is seen


def test_no_depth_lifts_to_nothing() -> None:
    depth, K, pose, origin, cube = wall_view()
    assert not bool(lift_depth(depth * 0, K, pose, origin, cube, 8).any())


def test_token_values_follow_the_token_orders() -> None:
    g = torch.Generator().manual_seed(0)
    lifted = (torch.rand(2, 4, 4, 4, 2, generator=g) > 0.5).float()
    coords = torch.tensor([[0, 1, 2, 3], [1, 0, 0, 0], [1, 3, 3, 1]])
    vals = cell_values(lifted, coords)
    for row, (b, x, y, z) in enumerate(coords.tolist()):
        assert torch.equal(vals[row], lifted[b, x, y, z])
    patches = patch_values(lifted, 2)  # [B·(R/p)³, 2·p³]: the surface channel's p³ values, then the free ones
    assert patches.shape == (2 * 8, 16)
    assert torch.equal(patches[:, :8], patchify(lifted[..., 0], 2)[0])
    assert torch.equal(patches[:, 8:], patchify(lifted[..., 1], 2)[0])
