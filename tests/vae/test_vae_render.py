"""The differentiable voxel renderer agrees with geometry and passes gradients to occupancy."""

from __future__ import annotations

import torch

from interiorfusion_vae.render import sobel_edges, soft_render


def _camera(size: int = 32, fov_px: float = 32.0) -> torch.Tensor:
    return torch.tensor([[fov_px, 0, size / 2], [0, fov_px, size / 2], [0, 0, 1]], dtype=torch.float64)


def _wall(z: float, voxel: float = 0.05, half: float = 1.5) -> torch.Tensor:
    g = torch.arange(-half, half, voxel, dtype=torch.float64) + voxel / 2
    yy, xx = torch.meshgrid(g, g, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten(), torch.full_like(xx.flatten(), z)], dim=1)


def test_depth_of_a_wall_and_front_surface_wins() -> None:
    K = _camera()
    pose = torch.eye(4, dtype=torch.float64)
    front, back = _wall(1.0), _wall(2.0)
    pts = torch.cat([front, back])
    probs = torch.ones(len(pts), dtype=torch.float64)
    out = soft_render(pts, probs, K, pose, 32, 32, voxel_size=0.05)
    centre = out.depth[8:24, 8:24]
    assert torch.allclose(centre, torch.full_like(centre, 1.0), atol=0.01)
    assert (out.alpha[8:24, 8:24] > 0.99).all()
    # Without the front wall the back wall shows.
    probs[: len(front)] = 0
    out = soft_render(pts, probs, K, pose, 32, 32, voxel_size=0.05)
    assert torch.allclose(out.depth[8:24, 8:24], torch.full((16, 16), 2.0, dtype=torch.float64), atol=0.01)


def test_gradients_reach_probabilities_and_features() -> None:
    K = _camera()
    pose = torch.eye(4, dtype=torch.float64)
    pts = torch.cat([_wall(1.0), _wall(2.0)])
    logits = torch.zeros(len(pts), dtype=torch.float64, requires_grad=True)
    feats = torch.randn(len(pts), 3, dtype=torch.float64, requires_grad=True)
    out = soft_render(pts, torch.sigmoid(logits), K, pose, 32, 32, 0.05, features=feats)
    # Asking for depth 2 (the back wall) must push the front wall's occupancy down.
    loss = (out.depth[8:24, 8:24] - 2.0).abs().mean() + out.features.square().mean()
    loss.backward()
    n = len(pts) // 2
    assert logits.grad[:n].sum() > 0 and feats.grad.abs().sum() > 0


def test_sobel_edges_find_a_step() -> None:
    img = torch.zeros(8, 8)
    img[:, 4:] = 1.0
    e = sobel_edges(img)
    assert e[:, 3:5].min() > 0.2 and e[:, :2].max() < 1e-3


def test_normal_term_skips_pixels_without_a_true_normal() -> None:
    """Captured frames: depth may be valid where the mesh (hence the rendered normal map) has nothing."""
    from interiorfusion_core.sparse import SparseTensor
    from interiorfusion_vae.losses import render_terms
    from interiorfusion_vae.model import DecoderOutput

    n = 60
    ii, jj = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    coords = torch.stack([torch.zeros(n * n, dtype=torch.int64), ii.flatten(), jj.flatten(),
                          torch.full((n * n,), 20)], dim=1).int()
    material = torch.zeros(n * n, 8)
    material[:, 7] = -1.0  # world normals facing the camera at the origin
    out = DecoderOutput([], [], SparseTensor(coords, material, 64), torch.full((n * n,), 10.0), material)
    depth = torch.full((1, 1, 32, 32), 1.025)
    normal = torch.zeros(1, 1, 3, 32, 32)
    normal[:, :, 2, :, :16] = -1.0  # the right half has depth but no normal
    batch = {"origin": torch.tensor([[-1.5, -1.5, 0.0]]), "voxel_size": torch.tensor([0.05]), "depth": depth,
             "normal": normal, "intrinsics": _camera().float()[None, None], "cam_to_world": torch.eye(4)[None, None]}
    terms = render_terms(out, batch, max_views=1)
    assert float(terms["depth"]) < 0.02
    assert float(terms["normal"]) < 0.02
