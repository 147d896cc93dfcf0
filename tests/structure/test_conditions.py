"""The Structure DiT's condition tokens (interiorfusion_structure.conditions) and the frozen-feature cache, on
tiny randomly initialised DINOv3 / Mask2Former models and a procedural scene's real layout text."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from interiorfusion_core.errors import UserError
from interiorfusion_data.format import spatiallm_text
from interiorfusion_data.frame import metric_frame
from interiorfusion_data.procedural import generate_scene
from interiorfusion_data.scene import CLASS_ID
from interiorfusion_structure.conditions import (
    LAYOUT_KINDS,
    MODALITY_ID,
    ConditionEncoder,
    ConditionTokens,
    build_frozen_encoders,
    drop_mask,
    frozen_features,
    layout_arrays,
    parse_layout,
)
from interiorfusion_structure.config import MODALITIES, ConditioningConfig
from interiorfusion_structure.feature_cache import FeatureCache, open_feature_caches

S = 64  # image_size: 4×4 ViT patches, semantic levels 1/32 + 1/16 = 2² + 4² tokens, depth 4×4 tokens
TINY: dict[str, Any] = {
    "width": 48, "image_size": S, "image_dim": 32, "semantic_dim": 32, "layout_dim": 32, "layout_heads": 2,
    "layout_layers": 1, "depth_channels": [8, 8, 16], "depth_dim": 16, "camera_dim": 16,
    "image_encoder": {"source": "facebook/dinov3-vitl16-pretrain-lvd1689m", "random_init": True},
    "semantic_encoder": {"source": "facebook/mask2former-swin-large-ade-semantic", "random_init": True},
}
COUNTS = {"image": 1 + 4 + 16, "depth": 16, "semantic": 4 + 16, "camera": 1}  # tiny DINOv3: CLS + 4 registers


def tiny(**overrides: Any) -> ConditioningConfig:
    return ConditioningConfig.model_validate({**TINY, **overrides})


@pytest.fixture(scope="module")
def scene() -> tuple[str, Any, Any]:
    sc = generate_scene(0, 3)
    lo, hi = sc.bounds()
    return spatiallm_text(sc), sc, metric_frame(lo, hi)


@pytest.fixture(scope="module")
def frozen() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return build_frozen_encoders(tiny())


def make_batch(scene: tuple[str, Any, Any], b: int = 3, seed: int = 0) -> dict[str, Any]:
    text, _, frame = scene
    g = torch.Generator().manual_seed(seed)
    k = torch.tensor([[40.0, 0, 24], [0, 40.0, 24], [0, 0, 1]])
    c2w = torch.eye(4).repeat(b, 1, 1)
    c2w[:, :3, 3] = torch.tensor(frame.origin, dtype=torch.float32) + torch.rand(b, 3, generator=g) * 4
    return {
        "rgb": torch.rand(b, 3, 48, 48, generator=g),
        "depth": torch.rand(b, 48, 48, generator=g) * 4 * (torch.rand(b, 48, 48, generator=g) > 0.1),
        "intrinsics": k.repeat(b, 1, 1), "cam_to_world": c2w,
        "origin": torch.tensor(frame.origin, dtype=torch.float32).repeat(b, 1),
        "cube_size": torch.full((b,), float(frame.cube_size)),
        "layout_text": [text, "", *[text] * (b - 2)], "has_layout": torch.tensor([True, True, *[False] * (b - 2)]),
    }


def with_features(batch: dict[str, Any], frozen: dict[str, torch.nn.Module]) -> dict[str, Any]:
    return {**batch, **frozen_features(frozen, batch)}


def segments(out: ConditionTokens, b: int) -> dict[str, torch.Tensor]:
    lo, hi = out.offsets[b], out.offsets[b + 1]
    toks, mods = out.tokens[lo:hi], out.modality[lo:hi]
    return {m: toks[mods == MODALITY_ID[m]] for m in MODALITIES}


def test_tokens_are_packed_per_sample_in_modality_order(scene: Any, frozen: Any) -> None:
    torch.manual_seed(1)
    enc = ConditionEncoder(tiny()).eval()
    out = enc.encode(with_features(make_batch(scene), frozen))
    n_layout = len(parse_layout(scene[0]))
    # Sample 0 has a layout; sample 1's text is empty and sample 2 has has_layout false: the null token each.
    expected = [sum(COUNTS.values()) + k for k in (n_layout, 1, 1)]
    assert out.lengths.tolist() == expected and out.lengths.dtype == torch.int64
    assert out.tokens.shape == (sum(expected), 48) and out.modality.shape == (sum(expected),)
    assert out.pooled.shape == (3, 48)
    for b in range(3):
        mods = out.modality[out.offsets[b]: out.offsets[b + 1]]
        assert torch.equal(mods, mods.sort().values)  # contiguous, in MODALITIES order
        seg = segments(out, b)
        assert {m: len(seg[m]) for m in COUNTS} == COUNTS
        assert torch.allclose(out.pooled[b], torch.stack([seg[m].mean(0) for m in MODALITIES]).mean(0), atol=1e-6)
    assert torch.equal(segments(out, 1)["layout"][0], enc.null[MODALITY_ID["layout"]])
    padded, mask = out.padded()
    assert padded.shape == (3, max(expected), 48) and mask.sum(1).tolist() == expected
    assert torch.equal(padded[mask], out.tokens)


def test_forced_drop_replaces_a_modality_by_its_null_token(scene: Any, frozen: Any) -> None:
    torch.manual_seed(1)
    enc = ConditionEncoder(tiny()).eval()
    batch = with_features(make_batch(scene), frozen)
    full = enc.encode(batch)
    dropped = enc.encode(batch, drop={"layout": torch.tensor([True, False, False]), "image": torch.tensor([False, True,
                                                                                                     False])})
    s0, s1, s2 = (segments(dropped, b) for b in range(3))
    assert torch.equal(s0["layout"], enc.null[MODALITY_ID["layout"]][None])
    assert torch.equal(s1["image"], enc.null[MODALITY_ID["image"]][None])
    assert torch.equal(s0["image"], segments(full, 0)["image"])  # the rest is untouched
    assert torch.equal(s2["image"], segments(full, 2)["image"])
    assert dropped.lengths.tolist() == [full.lengths[0] - len(parse_layout(scene[0])) + 1,
                                        full.lengths[1] - COUNTS["image"] + 1, full.lengths[2]]
    with pytest.raises(ValueError, match="unknown modalities"):
        enc.encode(batch, drop={"colour": torch.ones(3, dtype=torch.bool)})


def test_dropping_everything_ignores_the_inputs(scene: Any, frozen: Any) -> None:
    torch.manual_seed(1)
    enc = ConditionEncoder(tiny()).eval()
    a = enc.encode(with_features(make_batch(scene, seed=0), frozen), drop=drop_mask(3))
    b = enc.encode(with_features(make_batch(scene, seed=7), frozen), drop=drop_mask(3))
    bare = enc.encode({"rgb": torch.zeros(3, 3, 8, 8)}, drop=drop_mask(3))  # nothing of a dropped modality is read
    for other in (b, bare):
        assert torch.equal(a.tokens, other.tokens) and torch.equal(a.pooled, other.pooled)
    assert a.lengths.tolist() == [len(MODALITIES)] * 3
    assert torch.equal(a.tokens[:5], enc.null)


def test_training_dropout_follows_the_configured_probabilities(scene: Any, frozen: Any) -> None:
    batch = with_features(make_batch(scene), frozen)
    always = ConditionEncoder(tiny(dropout={m: 1.0 for m in MODALITIES})).train()
    assert always.encode(batch).lengths.tolist() == [len(MODALITIES)] * 3
    never = ConditionEncoder(tiny(dropout={m: 0.0 for m in MODALITIES})).train()
    assert never.encode(batch).lengths.tolist() == never.eval().encode(batch).lengths.tolist()
    # Training with `drop` given: forced, not sampled (the probabilities are ignored).
    assert always.train().encode(batch, drop={}).lengths.tolist() == never.encode(batch).lengths.tolist()


def test_missing_weights_are_a_one_sentence_user_error_naming_the_key(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = str(tmp_path / "dinov3-vitl16")
    for source in (missing, "interiorfusion-tests/no-such-dinov3"):
        cfg = tiny(image_encoder={"source": source}, modalities=["image"])
        with pytest.raises(UserError) as err:
            build_frozen_encoders(cfg)
        msg = str(err.value)
        assert msg.startswith("model.conditioning.image_encoder.source: ") and source in msg
        assert "random_init: true" in msg and "download" in msg
        assert msg.endswith(".") and ". " not in msg.replace(source, "") and "\n" not in msg  # one sentence
    with pytest.raises(UserError, match=r"model\.conditioning\.semantic_encoder\.source: .*no-such"):
        build_frozen_encoders(tiny(semantic_encoder={"source": "interiorfusion-tests/no-such-m2f"},
                                   modalities=["semantic"]))


def test_random_init_builds_the_real_transformers_classes(frozen: Any, caplog: pytest.LogCaptureFixture) -> None:
    from transformers import DINOv3ViTModel
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerPixelLevelModule

    assert isinstance(frozen["image"].model, DINOv3ViTModel)
    assert isinstance(frozen["semantic"].pixel_level, Mask2FormerPixelLevelModule)
    feats = frozen_features(frozen, {"rgb": torch.rand(2, 3, 40, 56)})
    assert feats["image_features"].shape == (2, COUNTS["image"], 32)
    assert feats["semantic_features"].shape == (2, COUNTS["semantic"], 32)
    assert not feats["image_features"].requires_grad
    with caplog.at_level(logging.WARNING, logger="interiorfusion_structure"):
        build_frozen_encoders(tiny(modalities=["image"]))
    assert "random weights" in caplog.text
    with pytest.raises(UserError, match=r"image_dim is 64 but .* has hidden_size 32; set model\.conditioning"):
        build_frozen_encoders(tiny(modalities=["image"], image_dim=64, image_encoder_config={"hidden_size": 32}))
    assert not build_frozen_encoders(tiny(modalities=["depth", "camera"]))  # disabled: nothing is built


def test_feature_cache_hit_is_identical_and_a_corrupt_entry_is_recomputed(frozen: Any, tmp_path: Path) -> None:
    enc = frozen["image"]
    calls: list[int] = []

    def compute(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return enc.features(x)

    images = torch.rand(3, 3, 48, 48)
    cache = FeatureCache(tmp_path, enc.identity)
    first = cache.features(images, compute, enc.cache_variant)
    assert calls == [3] and torch.equal(first, enc.features(images))
    again = FeatureCache(str(tmp_path), enc.identity).features(images, compute, enc.cache_variant)
    assert calls == [3] and torch.equal(again, first)  # read back bit-identical, nothing recomputed

    entries = sorted(tmp_path.rglob("*.safetensors"))
    assert len(entries) == 3 and all(p.relative_to(tmp_path).parts[:2] == (enc.identity, "64px-float32")
                                     for p in entries)
    data = bytearray(entries[0].read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the tensor data: parses, fails the checksum
    entries[0].write_bytes(bytes(data))
    entries[1].write_bytes(entries[1].read_bytes()[:100])  # truncated: does not parse
    cache = FeatureCache(tmp_path, enc.identity)
    assert torch.equal(cache.features(images, compute, enc.cache_variant), first)
    assert calls == [3, 2] and cache.stats() == {"hits": 1, "misses": 2, "corrupt": 2}
    assert FeatureCache(tmp_path, enc.identity).get_many(images, enc.cache_variant)[0] is not None  # rewritten
    assert FeatureCache(tmp_path, enc.identity).get_many(images, "32px-float32") == [None] * 3  # other variant
    assert not list(tmp_path.rglob("*.tmp"))

    caches = open_feature_caches(tmp_path, frozen)
    batch = {"rgb": images}
    assert torch.equal(frozen_features(frozen, batch, caches)["image_features"], first)
    assert caches["image"].stats()["hits"] == 3 and caches["semantic"].stats()["misses"] == 3


def test_layout_of_a_procedural_scene(scene: Any) -> None:
    text, sc, frame = scene
    stmts = parse_layout(text)
    n_struct = len(sc.walls) + len(sc.doors) + len(sc.windows)
    assert len(stmts) == n_struct + len(sc.objects) and len(sc.walls) >= 4 and sc.objects
    assert [s.kind for s in stmts[n_struct:]] == ["bbox"] * len(sc.objects)
    kinds, classes, params = layout_arrays(stmts, torch.tensor(frame.origin), frame.cube_size, CLASS_ID, 27)
    assert kinds.tolist() == [LAYOUT_KINDS.index(s.kind) for s in stmts]
    assert classes[n_struct:].tolist() == [CLASS_ID[o.label] for o in sc.objects]
    assert (classes[:n_struct] == -1).all()
    walls, boxes = params[kinds == 0], params[kinds == 3]
    assert ((walls[:, :6] >= 0) & (walls[:, :6] <= 1)).all()  # the room lies inside the voxel cube
    assert ((boxes[:, :3] >= 0) & (boxes[:, :3] <= 1)).all()
    assert torch.allclose(boxes[:, 3] ** 2 + boxes[:, 4] ** 2, torch.ones(len(boxes)))  # yaw as (sin, cos)
    a = torch.tensor(sc.walls[0].a, dtype=torch.float64)
    assert torch.allclose(walls[0, :3].double(), (a - torch.tensor(frame.origin)) / frame.cube_size, atol=1e-3)
    with pytest.raises(ValueError, match="line 2"):
        parse_layout("wall_0=Wall(0,0,0,1,0,0,2.5,0.1)\nchair at 1,2\n")
    with pytest.raises(ValueError, match="takes 7 numbers"):
        parse_layout("bbox_0=Bbox(bed,1,2,3,0.5,1,1)\n")


def test_gradients_reach_the_trained_parts_and_not_the_frozen_ones(scene: Any, frozen: Any) -> None:
    enc = ConditionEncoder(tiny(dropout={m: 0.0 for m in MODALITIES})).train()
    out = enc.encode(with_features(make_batch(scene), frozen))
    (out.tokens.square().mean() + out.pooled.square().mean()).backward()
    grads = {n: p.grad for n, p in enc.named_parameters()}
    assert all(g is not None for g in grads.values())  # even the unused null tokens (DDP needs every grad)
    silent = [n for n, g in grads.items() if not g.abs().sum() > 0 and n != "null"]
    assert not silent, f"no gradient reaches {silent}"
    assert grads["null"][MODALITY_ID["layout"]].abs().sum() > 0  # samples 1 and 2 have no layout
    for module in frozen.values():
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
