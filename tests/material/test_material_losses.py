"""Stage 3's loss terms: each is zero for a perfect prediction and positive otherwise; LPIPS's backbone loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interiorfusion_core.config.base import DistanceTerm, PretrainedRef
from interiorfusion_core.errors import UserError
from interiorfusion_material.losses import ViewPixels, distance, image_terms, material_terms, normal_cosine
from interiorfusion_material.perceptual import BACKBONE_FILES, build_lpips, check_lpips_weights, load_backbone


def materials(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(n, 8, generator=g)
    m[:, 5:8] = torch.nn.functional.normalize(m[:, 5:8] * 2 - 1, dim=1)
    return m


@pytest.fixture(scope="module")
def lpips_net() -> torch.nn.Module:
    return build_lpips(PretrainedRef(source="torchvision", random_init=True))


def test_distance_types_are_honoured() -> None:
    a, b = torch.zeros(4), torch.full((4,), 0.5)
    assert float(distance(a, b, "l1")) == pytest.approx(0.5)
    assert float(distance(a, b, "mse")) == pytest.approx(0.25)
    assert float(distance(a[:0], b[:0], "l1")) == 0.0


@pytest.mark.parametrize("kind", ["l1", "mse"])
def test_material_terms_zero_for_perfect_positive_otherwise(kind: str) -> None:
    truth = materials(50)
    terms = material_terms(truth.clone(), truth, DistanceTerm(type=kind), DistanceTerm(type=kind))
    assert set(terms) == {"albedo", "metallic_roughness", "normal"}
    for name, value in terms.items():
        assert float(value) == pytest.approx(0.0, abs=1e-6), name
    wrong = materials(50, seed=1)
    for name, value in material_terms(wrong, truth, DistanceTerm(type=kind), DistanceTerm(type=kind)).items():
        assert float(value) > 0.01, name


def test_normal_cosine_ignores_scale_and_skips_zero_targets() -> None:
    truth = materials(10)[:, 5:8]
    assert float(normal_cosine(truth * 3.0, truth)) == pytest.approx(0.0, abs=1e-6)
    assert float(normal_cosine(-truth, truth)) == pytest.approx(0.0, abs=1e-6)  # an orientation: n ~ −n
    side = torch.nn.functional.normalize(torch.cross(truth, torch.randn(10, 3), dim=1), dim=1)
    assert float(normal_cosine(side, truth)) == pytest.approx(1.0, abs=1e-5)
    holes = torch.cat([truth, torch.zeros(5, 3)])
    assert float(normal_cosine(torch.cat([truth, torch.ones(5, 3)]), holes)) == pytest.approx(0.0, abs=1e-6)


def _pixels(shaded_target: torch.Tensor, h: int = 8, w: int = 8) -> list[ViewPixels]:
    """A view whose hit pixels' stored colour is `shaded_target`'s shading of the given materials."""
    g = torch.Generator().manual_seed(3)
    n = h * w
    hit = torch.rand(n, generator=g) > 0.3
    points = torch.rand(int(hit.sum()), 3, generator=g) * 2
    rows = torch.arange(int(hit.sum()))
    eye = torch.tensor([1.0, -2.0, 1.5])
    lights = torch.tensor([[1.0, 1.0, 2.5, 1.6]])
    px = ViewPixels(0, 0, torch.rand(3, h, w, generator=g), hit, points, rows, eye, lights)
    from interiorfusion_material.losses import shade_pixels

    img = px.image.reshape(3, -1).clone()
    img[:, hit] = shade_pixels(px, shaded_target).T
    px.image = img.reshape(3, h, w)
    return [px]


@pytest.mark.parametrize("kind", ["mse", "l1"])
def test_image_terms_zero_when_the_shading_matches_the_stored_rgb(kind: str, lpips_net) -> None:
    truth = materials(64)
    pixels = _pixels(truth)
    terms = image_terms(pixels, truth.clone(), DistanceTerm(type=kind), lpips_net)
    assert float(terms["rendering"]) == pytest.approx(0.0, abs=1e-7)
    assert float(terms["perceptual"]) == pytest.approx(0.0, abs=1e-6)
    wrong = materials(64, seed=5)
    terms = image_terms(pixels, wrong, DistanceTerm(type=kind), lpips_net)
    assert float(terms["rendering"]) > 1e-3 and float(terms["perceptual"]) > 1e-4


def test_image_terms_carry_gradients_to_the_materials(lpips_net) -> None:
    truth = materials(64)
    pixels = _pixels(truth)
    pred = materials(64, seed=7).requires_grad_(True)
    terms = image_terms(pixels, pred, DistanceTerm(type="mse"), lpips_net)
    (terms["rendering"] + terms["perceptual"]).backward()
    assert pred.grad is not None and float(pred.grad[:, :3].abs().sum()) > 0


def test_a_real_config_without_the_backbone_file_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(UserError, match=r"lpips_weights: LPIPS \(vgg\) needs torchvision's ImageNet weights "
                                        r"vgg16-397923af.pth.*random_init"):
        check_lpips_weights(PretrainedRef(source=str(tmp_path)), "vgg")
    check_lpips_weights(PretrainedRef(source=str(tmp_path), random_init=True), "vgg")  # tests: allowed


def test_backbone_loads_from_a_torchvision_checkpoint_file(tmp_path) -> None:
    """A torchvision-format VGG16 state dict (features.<i>.*) in the configured folder is what the backbone gets."""
    import torchvision

    vgg = torchvision.models.vgg16(weights=None)
    state = {k: v for k, v in vgg.state_dict().items() if k.startswith("features.")}
    torch.save(state, tmp_path / BACKBONE_FILES["vgg"])
    net = build_lpips(PretrainedRef(source=str(tmp_path)))
    assert torch.equal(getattr(net.net.slice1, "0").weight, state["features.0.weight"])
    assert torch.equal(getattr(net.net.slice5, "28").bias, state["features.28.bias"])
    bad = {k: v for k, v in state.items() if not k.startswith("features.28")}
    with pytest.raises(UserError, match="lacks the backbone tensors"):
        load_backbone(net.net, bad, "x.pth")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / BACKBONE_FILES["vgg"]).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable torchvision checkpoint"):
        build_lpips(PretrainedRef(source=str(tmp_path / "broken")))


def test_lpips_of_identical_images_is_zero(lpips_net) -> None:
    from interiorfusion_material.perceptual import lpips_distance

    x = torch.rand(2, 3, 32, 32)
    assert float(lpips_distance(lpips_net, x, x)) == 0.0
    assert float(lpips_distance(lpips_net, x, torch.rand(2, 3, 32, 32))) > 0
    assert np.isfinite(float(lpips_distance(lpips_net, x, 1 - x)))
