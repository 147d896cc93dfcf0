"""The Structure DiT's condition tokens: one chosen view of a sample (RGB, depth, camera) plus its layout text,
encoded per modality, projected to `ConditioningConfig.width` and packed per sample (docs/structure-conditions.md).

Two halves, because the engine builds them separately (`TrainTask.build_model` vs `TrainTask.frozen_models`):
- frozen encoders (`build_frozen_encoders`): DINOv3 for the image, Mask2Former's pixel decoder for semantics.
  Never trained, never partitioned; `frozen_features` runs them (or reads their features from a FeatureCache).
- `ConditionEncoder` (trained): the depth CNN, the layout transformer, the camera MLP, the per-modality
  projections, type embeddings and null tokens. It takes the frozen features as batch entries.

The generation frame is the data's gravity-aligned metric voxel frame (origin + [0, cube_size]³, z up); the
camera's pose in that frame is one more condition token, so the DiT never has to guess where the view stands.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from interiorfusion_core.config.base import PretrainedRef
from interiorfusion_core.errors import UserError
from interiorfusion_structure.config import MODALITIES, ConditioningConfig

log = logging.getLogger("interiorfusion_structure")

MODALITY_ID: dict[str, int] = {m: i for i, m in enumerate(MODALITIES)}
CONFIG_KEY = "model.conditioning"
# Both frozen encoders were trained on ImageNet-normalised inputs (their image processors' defaults).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_KEYS = {"image": "image_features", "semantic": "semantic_features"}
LAYOUT_KINDS = ("wall", "door", "window", "bbox")
LAYOUT_PARAMS = 8  # the longest statement's numeric parameters (wall, bbox)
CAMERA_PARAMS = 13  # fx/W, fy/H, cx/W, cy/H, position (3), rotation 6D (6)


def tiny_dinov3_config(hidden: int) -> dict[str, Any]:
    """DINOv3ViTConfig kwargs of a 2-layer ViT for `random_init` (milliseconds on a CPU)."""
    return {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2, "num_attention_heads": 2,
            "patch_size": 16, "num_register_tokens": 4}


def tiny_mask2former_config(feature: int) -> dict[str, Any]:
    """Mask2FormerConfig kwargs of a one-block-per-stage Swin and a one-layer pixel decoder for `random_init`."""
    return {"backbone_config": {"model_type": "swin", "embed_dim": 16, "depths": [1, 1, 1, 1],
                                "num_heads": [1, 1, 1, 1], "window_size": 4,
                                "out_features": ["stage1", "stage2", "stage3", "stage4"]},
            "feature_size": feature, "mask_feature_size": feature, "hidden_dim": 32, "encoder_feedforward_dim": 64,
            "encoder_layers": 1, "decoder_layers": 1, "num_attention_heads": 2, "dim_feedforward": 64,
            "num_queries": 4}


# ---- frozen encoders ----------------------------------------------------------------------------------------
def weights_digest(module: nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes): the cache key's part that says which weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # bytes of any dtype (numpy has no bf16)
    return h.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.")[-80:] or "model"


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


@contextmanager
def replicated_build() -> Iterator[None]:
    """transformers builds (and loads) a model under DeepSpeed's zero.Init whenever a ZeRO-3 config is registered
    with it, which accelerate does under ZeRO-3: a frozen encoder built then would be partitioned, and called
    outside the DeepSpeed engine nobody would gather its weights. Frozen encoders stay whole on every rank."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        yield
        return
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref  # transformers keeps no public "suspend" switch
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def load_pretrained(cls: Any, ref: PretrainedRef, key: str, random_config: Mapping[str, Any]) -> nn.Module:
    with replicated_build():
        return _load_pretrained(cls, ref, key, random_config)


def _load_pretrained(cls: Any, ref: PretrainedRef, key: str, random_config: Mapping[str, Any]) -> nn.Module:
    """`cls.from_pretrained(ref.source)`, or `cls(config)` from `random_config` when `ref.random_init`. A source
    that cannot be loaded is a UserError naming `key`: random weights are never a silent fallback."""
    if ref.random_init:
        log.warning("%s.random_init is true: %s has random weights (tests and smoke runs only; its features "
                    "carry no meaning)", key, cls.__name__)
        return cls(cls.config_class(**random_config))
    source = ref.source
    path = Path(source).expanduser()
    # A hub id is exactly "owner/name"; anything else (or anything on disk) is a local path.
    local = path.exists() or source.startswith(("/", ".", "~")) or source.count("/") != 1
    if local and not path.is_dir():
        raise UserError(f"{key}.source: the local directory {source!r} does not exist; download the weights "
                        f"there or point source at the directory that holds them (or set {key}.random_init: true "
                        "in tests only).")
    offline = local or _hub_offline()
    try:
        return cls.from_pretrained(str(path) if local else source, local_files_only=offline)
    except (OSError, ValueError) as exc:  # transformers raises OSError for missing or gated files
        where = "could not be loaded from that directory" if local else (
            "is not in the local Hugging Face cache and cannot be downloaded here" if offline
            else "could not be downloaded")
        raise UserError(f"{key}.source: {cls.__name__} weights {source!r} {where} ({type(exc).__name__}); download "
                        f"them ahead of time (`hf download {source}`) or set source to a local directory (or set "
                        f"{key}.random_init: true in tests only).") from exc


def check_pretrained(config: ConditioningConfig) -> None:
    """Fail now, in one sentence, when an enabled frozen encoder's weights are not at hand (a local directory
    without config.json, a hub id not in the local cache while offline): before any model is built or trained."""
    refs = [(m, ref) for m, ref in (("image", config.image_encoder), ("semantic", config.semantic_encoder))
            if config.enabled(m) and not ref.random_init]
    for modality, ref in refs:
        key = f"{CONFIG_KEY}.{modality}_encoder"
        path = Path(ref.source).expanduser()
        local = path.exists() or ref.source.startswith(("/", ".", "~")) or ref.source.count("/") != 1
        if local:
            if not (path / "config.json").is_file():
                raise UserError(f"{key}.source: the local directory {ref.source!r} does not exist or holds no "
                                f"config.json; download the weights there or point source at the directory that "
                                f"holds them (or set {key}.random_init: true in tests only).")
        elif _hub_offline():
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(ref.source, "config.json"), str):
                raise UserError(f"{key}.source: {ref.source!r} is not in the local Hugging Face cache and cannot be "
                                f"downloaded here; download it ahead of time (`hf download {ref.source}`) or set "
                                f"source to a local directory (or set {key}.random_init: true in tests only).")


def _prepare(rgb: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] → resized to size × size and ImageNet-normalised, in the encoder's dtype/device."""
    x = rgb.to(device=mean.device, dtype=torch.float32)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return ((x - mean.float()) / std.float()).to(mean.dtype)


class _FrozenEncoder(nn.Module):
    """What both frozen encoders share: input normalisation, `identity` (fixed when built, before the trainer
    casts the weights) and `cache_variant` (resize and compute dtype: the rest of the cache key)."""

    modality: str
    feature_key: str

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.identity = ""

    @property
    def cache_variant(self) -> str:
        dtype = str(self.mean.dtype).removeprefix("torch.")
        return f"{self.image_size}px-{dtype}"

    def features(self, rgb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.features(rgb)


class FrozenImageEncoder(_FrozenEncoder):
    """DINOv3 ViT: `features(rgb)` is its last_hidden_state [B, 1 + registers + (S/patch)², hidden]."""

    modality = "image"
    feature_key = FEATURE_KEYS["image"]

    def __init__(self, model: nn.Module, image_size: int, source: str) -> None:
        super().__init__(image_size)
        self.model = model.eval().requires_grad_(False)
        self.dim = int(model.config.hidden_size)
        self.patch_size = int(model.config.patch_size)
        self.prefix_tokens = 1 + int(model.config.num_register_tokens)
        self.identity = f"dinov3-{_slug(source)}-{weights_digest(self.model)[:16]}"

    @torch.no_grad()
    def features(self, rgb: torch.Tensor) -> torch.Tensor:
        x = _prepare(rgb, self.image_size, self.mean, self.std)
        return self.model(pixel_values=x).last_hidden_state


def semantic_grid(image_size: int, level: int) -> int:
    """Side of pixel-decoder level `level` (0 = 1/32, 1 = 1/16, 2 = 1/8): Swin's stages halve with padding."""
    side = math.ceil(image_size / 4)
    for _ in range(3 - level):
        side = math.ceil(side / 2)
    return side


class FrozenSemanticEncoder(_FrozenEncoder):
    """Mask2Former's backbone + pixel decoder (the transformer decoder is not kept): `features(rgb)` is the chosen
    multi-scale maps flattened, coarse level first, [B, Σ side², feature_size]."""

    modality = "semantic"
    feature_key = FEATURE_KEYS["semantic"]

    def __init__(self, model: nn.Module, image_size: int, source: str, levels: Sequence[int]) -> None:
        super().__init__(image_size)
        self.pixel_level = model.pixel_level_module.eval().requires_grad_(False)
        self.dim = int(model.config.feature_size)
        self.levels = tuple(sorted(levels))
        tag = "".join(map(str, self.levels))
        self.identity = f"mask2former-{_slug(source)}-{weights_digest(self.pixel_level)[:16]}-l{tag}"

    @torch.no_grad()
    def features(self, rgb: torch.Tensor) -> torch.Tensor:
        x = _prepare(rgb, self.image_size, self.mean, self.std)
        maps = self.pixel_level(x, output_hidden_states=False).decoder_hidden_states
        return torch.cat([maps[lv].flatten(2).transpose(1, 2) for lv in self.levels], dim=1)


def build_frozen_encoders(config: ConditioningConfig) -> dict[str, nn.Module]:
    """The enabled frozen encoders, by modality ("image", "semantic"), on CPU in fp32, eval mode, no grad."""
    from transformers import DINOv3ViTModel, Mask2FormerModel

    out: dict[str, nn.Module] = {}
    if config.enabled("image"):
        cfg = {**tiny_dinov3_config(config.image_dim), **(config.image_encoder_config or {})}
        model = load_pretrained(DINOv3ViTModel, config.image_encoder, f"{CONFIG_KEY}.image_encoder", cfg)
        enc = FrozenImageEncoder(model, config.image_size, config.image_encoder.source)
        _check_dim(enc.dim, config.image_dim, "image_dim", "hidden_size", config.image_encoder.source)
        if config.image_size % enc.patch_size:
            raise UserError(f"{CONFIG_KEY}.image_size {config.image_size} is not a multiple of the image encoder's "
                            f"patch size {enc.patch_size}; pick a multiple.")
        out["image"] = enc
    if config.enabled("semantic"):
        cfg = {**tiny_mask2former_config(config.semantic_dim), **(config.semantic_encoder_config or {})}
        model = load_pretrained(Mask2FormerModel, config.semantic_encoder, f"{CONFIG_KEY}.semantic_encoder", cfg)
        enc = FrozenSemanticEncoder(model, config.image_size, config.semantic_encoder.source,
                                    config.semantic_levels)
        _check_dim(enc.dim, config.semantic_dim, "semantic_dim", "feature_size", config.semantic_encoder.source)
        out["semantic"] = enc
    return out


def _check_dim(actual: int, configured: int, field: str, name: str, source: str) -> None:
    if actual != configured:
        raise UserError(f"{CONFIG_KEY}.{field} is {configured} but {source!r} has {name} {actual}; set "
                        f"{CONFIG_KEY}.{field}: {actual}.")


def frozen_features(frozen: Mapping[str, nn.Module], batch: Mapping[str, Any],
                    cache: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """{"image_features": [B, K, C], "semantic_features": [B, K, C]} for the frozen encoders given, from
    `batch["rgb"]`; `cache` (modality → FeatureCache, see feature_cache.open_feature_caches) serves repeats."""
    rgb = batch["rgb"]
    out: dict[str, torch.Tensor] = {}
    for name, enc in frozen.items():
        c = None if cache is None else cache.get(name)
        feats = enc.features(rgb) if c is None else c.features(rgb, enc.features, enc.cache_variant)
        out[FEATURE_KEYS[name]] = feats.to(rgb.device)
    return out


# ---- layout text --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayoutStatement:
    """One `name=Kind(args)` line of layout.txt: `label` is a box's class or an opening's wall (else None)."""

    kind: str
    label: str | None
    values: tuple[float, ...]


_STATEMENT = re.compile(r"^\s*\w+\s*=\s*(Wall|Door|Window|Bbox)\s*\((.*)\)\s*$")
_ARITY = {"wall": (False, 8), "door": (True, 5), "window": (True, 5), "bbox": (True, 7)}


def retrieval_feature(frozen: Mapping[str, nn.Module], batch: Mapping[str, Any], b: int) -> torch.Tensor:
    """Sample b's condition image as one unit vector for nearest-room retrieval: the frozen image encoder's mean
    token, or the image itself at 16×16 when the config has no image encoder (CPU)."""
    feats = frozen_features(frozen, batch, None)
    if "image_features" in feats:
        f = feats["image_features"][b].float().mean(0)
    else:
        f = torch.nn.functional.interpolate(batch["rgb"][b:b + 1].float(), size=(16, 16)).flatten()
    return torch.nn.functional.normalize(f.cpu(), dim=0)


def parse_layout(text: str) -> list[LayoutStatement]:
    """SpatialLM-style statements (docs/data-format.md, layout.txt), walls/doors/windows before boxes."""
    out: list[LayoutStatement] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _STATEMENT.match(line)
        if m is None:
            raise ValueError(f"layout text line {n} is not a Wall/Door/Window/Bbox statement: {line.strip()!r}")
        kind, args = m.group(1).lower(), [a.strip() for a in m.group(2).split(",")]
        labelled, arity = _ARITY[kind]
        label = args.pop(0) if labelled else None
        if len(args) != arity:
            raise ValueError(f"layout text line {n}: {kind} takes {arity} numbers, got {len(args)}: {line.strip()!r}")
        try:
            values = tuple(float(a) for a in args)
        except ValueError:
            raise ValueError(f"layout text line {n} has a non-numeric parameter: {line.strip()!r}") from None
        out.append(LayoutStatement(kind, label, values))
    return sorted(out, key=lambda s: s.kind == "bbox")  # stable: structure first, so truncation drops boxes


def layout_arrays(statements: Sequence[LayoutStatement], origin: torch.Tensor, cube_size: float,
                  class_ids: Mapping[str, int], unknown_class: int,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kinds [K] int64, classes [K] int64, params [K, 8] float32) normalised by the voxel frame: positions
    (p − origin) / cube_size, lengths / cube_size, yaw as (sin, cos). Non-box statements get class −1."""
    o = [float(v) for v in origin]
    c = float(cube_size)
    kinds, classes, params = [], [], []
    for s in statements:
        v = s.values
        if s.kind == "wall":  # a (3), b (3), height, thickness
            p = [*((v[i] - o[i % 3]) / c for i in range(6)), v[6] / c, v[7] / c]
        elif s.kind == "bbox":  # centre (3), yaw, size (3)
            p = [*((v[i] - o[i]) / c for i in range(3)), math.sin(v[3]), math.cos(v[3]), *(x / c for x in v[4:7])]
        else:  # door / window: centre (3), width, height
            p = [*((v[i] - o[i]) / c for i in range(3)), v[3] / c, v[4] / c]
        kinds.append(LAYOUT_KINDS.index(s.kind))
        classes.append(class_ids.get(s.label or "", unknown_class) if s.kind == "bbox" else -1)
        params.append(p + [0.0] * (LAYOUT_PARAMS - len(p)))
    return (torch.tensor(kinds, dtype=torch.int64), torch.tensor(classes, dtype=torch.int64),
            torch.tensor(params, dtype=torch.float32).reshape(len(params), LAYOUT_PARAMS))


# ---- trained encoders ---------------------------------------------------------------------------------------
def _groups(width: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if (width % g == 0 and width // g >= 4) or g == 1)


class DepthEncoder(nn.Module):
    """Log-depth + validity → [B, out_dim, S / 2^n, S / 2^n]: n stride-2 blocks (conv, GroupNorm, SiLU, twice)."""

    def __init__(self, channels: Sequence[int], out_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 2
        for w in (*channels, out_dim):
            layers += [nn.Conv2d(cin, w, 3, stride=2, padding=1), nn.GroupNorm(_groups(w), w), nn.SiLU(),
                       nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(_groups(w), w), nn.SiLU()]
            cin = w
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LayoutBlock(nn.Module):
    """A pre-norm transformer encoder layer over padded statements. Not torch's nn.TransformerEncoderLayer: its
    attention reads `out_proj.weight` without calling `out_proj`, so ZeRO-3 (which gathers a module's weights in
    that module's own forward) would never gather it."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim], mask [B, L] (true = a statement): padded keys are never attended to."""
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + self.proj(att.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.norm2(x))


class LayoutEncoder(nn.Module):
    """One token per statement: kind embedding + class embedding (boxes) + MLP(params, kind one-hot), then a
    transformer encoder without positions (statement order carries no meaning)."""

    def __init__(self, dim: int, layers: int, heads: int, num_classes: int) -> None:
        super().__init__()
        self.kind_embed = nn.Embedding(len(LAYOUT_KINDS), dim)
        self.class_embed = nn.Embedding(num_classes + 1, dim)  # the last row: "not a box"
        self.params = nn.Sequential(nn.Linear(LAYOUT_PARAMS + len(LAYOUT_KINDS), dim), nn.SiLU(),
                                    nn.Linear(dim, dim))
        self.layers = nn.ModuleList(LayoutBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.num_classes = num_classes

    def forward(self, kinds: torch.Tensor, classes: torch.Tensor, params: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """[B, L] kinds, classes (−1: none), [B, L, 8] params, [B, L] mask (true = a statement) → [B, L, dim].
        Every row needs ≥ 1 statement (a fully masked row has no defined attention)."""
        onehot = F.one_hot(kinds, len(LAYOUT_KINDS)).to(params.dtype)
        cls = torch.where(classes < 0, self.num_classes, classes)
        x = self.kind_embed(kinds) + self.class_embed(cls) + self.params(torch.cat([params, onehot], -1))
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)


def grid_position_embedding(h: int, w: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """[h·w, dim] fixed 2D sin/cos of the cell centres in [0, 1]² (so grids of different strides agree on where
    a token looks in the image), frequencies π·2^0 … π·2^8."""
    quarter = dim // 4
    freqs = math.pi * 2.0 ** torch.linspace(0, 8, max(quarter, 1), device=device)
    ys = (torch.arange(h, device=device) + 0.5) / h
    xs = (torch.arange(w, device=device) + 0.5) / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    ay, ax = yy.reshape(-1, 1) * freqs, xx.reshape(-1, 1) * freqs
    emb = torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)[:, : 4 * quarter]
    return F.pad(emb, (0, dim - emb.shape[1]))


@dataclass
class ConditionTokens:
    """Packed condition tokens: sample b's tokens are rows offsets[b]:offsets[b + 1] of `tokens`, in sample
    order, its modalities in MODALITIES order. `modality` holds MODALITY_ID per token."""

    tokens: torch.Tensor  # [ΣK, D]
    lengths: torch.Tensor  # [B] int64, each ≥ 1
    pooled: torch.Tensor  # [B, D]: the AdaLN-single input's condition part
    modality: torch.Tensor  # [ΣK] int64

    @property
    def offsets(self) -> torch.Tensor:
        """[B + 1] int64 cumulative lengths (cu_seqlens of variable-length attention kernels)."""
        return F.pad(self.lengths.cumsum(0), (1, 0))

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, Kmax, D] zero-padded tokens, [B, Kmax] bool mask, true = a real token)."""
        b, kmax = len(self.lengths), int(self.lengths.max())
        mask = torch.arange(kmax, device=self.lengths.device)[None] < self.lengths[:, None]
        out = self.tokens.new_zeros(b, kmax, self.tokens.shape[-1])
        out[mask] = self.tokens
        return out, mask


def drop_mask(batch_size: int, *modalities: str, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """`drop` for ConditionEncoder.forward: the named modalities (default: all, the unconditional branch of
    classifier-free guidance) dropped for every sample."""
    names = modalities or MODALITIES
    return {m: torch.ones(batch_size, dtype=torch.bool, device=device) for m in names}


class ConditionEncoder(nn.Module):
    """The trained half: batch (+ frozen features) → ConditionTokens. See the module docstring."""

    def __init__(self, config: ConditioningConfig) -> None:
        super().__init__()
        from interiorfusion_data.scene import CLASS_ID, CLASSES, UNKNOWN

        self.config = config
        d = config.width
        self.modalities = tuple(m for m in MODALITIES if config.enabled(m))
        self.type_embed = nn.Parameter(torch.randn(len(MODALITIES), d) * 0.02)
        # A dropped (or absent) modality is one learned token: each sample keeps ≥ 1 token per modality.
        self.null = nn.Parameter(torch.randn(len(MODALITIES), d) * 0.02)
        self._class_ids, self._unknown = dict(CLASS_ID), int(UNKNOWN)
        if config.enabled("image"):
            self.image_proj = nn.Linear(config.image_dim, d)
        if config.enabled("depth"):
            self.depth_net = DepthEncoder(config.depth_channels, config.depth_dim)
            self.depth_proj = nn.Linear(config.depth_dim, d)
        if config.enabled("layout"):
            self.layout_net = LayoutEncoder(config.layout_dim, config.layout_layers, config.layout_heads,
                                            len(CLASSES))
            self.layout_proj = nn.Linear(config.layout_dim, d)
        if config.enabled("semantic"):
            self.semantic_proj = nn.Linear(config.semantic_dim, d)
            self.semantic_level = nn.Parameter(torch.zeros(len(config.semantic_levels), d))
        if config.enabled("camera"):
            self.camera_net = nn.Sequential(nn.Linear(CAMERA_PARAMS, config.camera_dim), nn.SiLU(),
                                            nn.Linear(config.camera_dim, config.camera_dim))
            self.camera_proj = nn.Linear(config.camera_dim, d)

    # -- per-modality tokens: dense [B, K, D] or a list of B [K_b, D] (K_b may be 0: the null token stands in) --
    def _image(self, batch: Mapping[str, Any]) -> torch.Tensor:
        feats = _need(batch, "image_features", "image")
        x = self.image_proj(feats.to(self.image_proj.weight.dtype))
        grid = self.config.image_size // (self.config.image_encoder_config or {}).get("patch_size", 16)
        prefix = x.shape[1] - grid * grid
        if prefix < 0:
            raise ValueError(f"image_features has {x.shape[1]} tokens, fewer than the {grid}² patches of "
                             f"image_size {self.config.image_size}")
        pos = grid_position_embedding(grid, grid, x.shape[-1], x.device).to(x.dtype)
        return x + F.pad(pos, (0, 0, prefix, 0))  # CLS and register tokens get no position

    def _depth(self, batch: Mapping[str, Any]) -> torch.Tensor:
        depth = _need(batch, "depth", "depth").float()
        cube = _cube_size(batch).to(depth.device).float().view(-1, 1, 1, 1)
        s = self.config.image_size
        # Nearest keeps invalid (0) pixels out of valid ones; log(depth / cube) is scale-aware and bounded.
        d = F.interpolate(depth[:, None], size=(s, s), mode="nearest")
        valid = d > 0
        logd = torch.where(valid, torch.log(d.clamp_min(1e-3) / cube), torch.zeros_like(d))
        w = self.depth_proj.weight
        fmap = self.depth_net(torch.cat([logd, valid.to(logd.dtype)], 1).to(w.dtype))
        h, wd = fmap.shape[-2:]
        x = self.depth_proj(fmap.flatten(2).transpose(1, 2))
        return x + grid_position_embedding(h, wd, x.shape[-1], x.device).to(x.dtype)

    def _semantic(self, batch: Mapping[str, Any]) -> torch.Tensor:
        feats = _need(batch, "semantic_features", "semantic")
        x = self.semantic_proj(feats.to(self.semantic_proj.weight.dtype))
        extras = []
        for i, level in enumerate(sorted(self.config.semantic_levels)):
            side = semantic_grid(self.config.image_size, level)
            extras.append(grid_position_embedding(side, side, x.shape[-1], x.device) + self.semantic_level[i])
        extra = torch.cat(extras).to(x.dtype)
        if extra.shape[0] != x.shape[1]:
            raise ValueError(f"semantic_features has {x.shape[1]} tokens; levels {self.config.semantic_levels} at "
                             f"image_size {self.config.image_size} give {extra.shape[0]}")
        return x + extra

    def _camera(self, batch: Mapping[str, Any]) -> torch.Tensor:
        k = _need(batch, "intrinsics", "camera").float()
        c2w = _need(batch, "cam_to_world", "camera").float().to(k.device)
        origin = _need(batch, "origin", "camera").float().to(k.device)
        cube = _cube_size(batch).float().to(k.device)
        h, w = _image_hw(batch)
        intr = torch.stack([k[:, 0, 0] / w, k[:, 1, 1] / h, k[:, 0, 2] / w, k[:, 1, 2] / h], 1)
        pos = (c2w[:, :3, 3] - origin) / cube[:, None]
        rot6 = c2w[:, :3, :2].transpose(1, 2).reshape(-1, 6)  # first two columns: continuous (Zhou et al. 2019)
        feats = torch.cat([intr, pos, rot6], 1).to(self.camera_proj.weight.dtype)
        return self.camera_proj(self.camera_net(feats))[:, None]

    def _layout(self, batch: Mapping[str, Any], keep: torch.Tensor) -> list[torch.Tensor]:
        texts = _need(batch, "layout_text", "layout")
        has = batch.get("has_layout")
        origin = _need(batch, "origin", "layout").detach().cpu().double()
        cube = _cube_size(batch).detach().cpu().double()
        device, dtype = self.layout_proj.weight.device, self.layout_proj.weight.dtype
        rows = []
        for b, text in enumerate(texts):
            present = bool(keep[b]) and (has is None or bool(has[b])) and bool(text and text.strip())
            stmts = parse_layout(text)[: self.config.max_layout_tokens] if present else []
            rows.append(layout_arrays(stmts, origin[b], float(cube[b]), self._class_ids, self._unknown))
        out = [torch.zeros(0, self.config.width, device=device, dtype=dtype) for _ in rows]
        used = [b for b, r in enumerate(rows) if len(r[0])]
        if not used:
            return out
        lmax = max(len(rows[b][0]) for b in used)
        kinds = torch.zeros(len(used), lmax, dtype=torch.int64)
        classes = torch.full((len(used), lmax), -1, dtype=torch.int64)
        params = torch.zeros(len(used), lmax, LAYOUT_PARAMS)
        mask = torch.zeros(len(used), lmax, dtype=torch.bool)
        for i, b in enumerate(used):
            n = len(rows[b][0])
            kinds[i, :n], classes[i, :n], params[i, :n], mask[i, :n] = *rows[b], True
        x = self.layout_net(kinds.to(device), classes.to(device), params.to(device, dtype), mask.to(device))
        x = self.layout_proj(x)
        for i, b in enumerate(used):
            out[b] = x[i, : len(rows[b][0])]
        return out

    def _drops(self, batch_size: int, drop: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        if drop is not None:
            unknown = set(drop) - set(MODALITIES)
            if unknown:
                raise ValueError(f"drop names unknown modalities {sorted(unknown)} (known: {', '.join(MODALITIES)})")
            out = {}
            for m in self.modalities:
                v = drop.get(m)
                v = torch.zeros(batch_size, dtype=torch.bool) if v is None else v.detach().cpu().bool().reshape(-1)
                if v.shape != (batch_size,):
                    raise ValueError(f"drop[{m!r}] has shape {tuple(v.shape)}, expected ({batch_size},)")
                out[m] = v
            return out
        if not self.training:
            return {m: torch.zeros(batch_size, dtype=torch.bool) for m in self.modalities}
        p = self.config.dropout
        return {m: torch.rand(batch_size) < getattr(p, m) for m in self.modalities}

    def encode(self, batch: Mapping[str, Any], drop: Mapping[str, torch.Tensor] | None = None) -> ConditionTokens:
        """The condition tokens of a batch (see `forward`), as a ConditionTokens."""
        return ConditionTokens(*self(batch, drop))

    def forward(self, batch: Mapping[str, Any], drop: Mapping[str, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`batch`: the chosen view's rgb/depth/intrinsics/cam_to_world, origin, cube_size (or voxel_size ×
        resolution), layout_text, has_layout, and the frozen features (`frozen_features`). `drop`: modality →
        bool [B], forcing which samples see that modality's null token (else sampled in training, none in eval).
        Inputs of a modality dropped for every sample are not read."""
        bsz = _batch_size(batch)
        drops = self._drops(bsz, drop)
        per_sample: list[list[torch.Tensor]] = [[] for _ in range(bsz)]
        anchor = self.null.sum() * 0  # the null tokens join the graph even when unused (DDP wants every grad)
        for m in self.modalities:
            mi = MODALITY_ID[m]
            keep = ~drops[m]
            toks: torch.Tensor | list[torch.Tensor] | None = None
            if keep.any():
                toks = self._layout(batch, keep) if m == "layout" else getattr(self, f"_{m}")(batch)
            elif self.training:
                # Dropped for the whole batch: still run it (weight 0) so every parameter gets its gradient, and
                # through its own module calls (ZeRO-3 gathers a module's weights only inside its forward).
                unused = self._layout(batch, ~keep) if m == "layout" else getattr(self, f"_{m}")(batch)
                parts = unused if isinstance(unused, list) else [unused]
                anchor = anchor + sum(t.sum() for t in parts if t is not None and t.numel()) * 0
            for b in range(bsz):
                t = None if toks is None or not keep[b] else toks[b]
                if t is None or len(t) == 0:
                    per_sample[b].append(self.null[mi: mi + 1])
                else:
                    per_sample[b].append(t + self.type_embed[mi])
        lengths = torch.tensor([sum(len(t) for t in s) for s in per_sample], dtype=torch.int64)
        tokens = torch.cat([t for s in per_sample for t in s])
        # Equal weight per modality: the 1k-token image must not drown the single camera token.
        pooled = torch.stack([torch.stack([t.mean(0) for t in s]).mean(0) for s in per_sample]) + anchor
        modality = torch.tensor([MODALITY_ID[m] for s in per_sample for m, t in zip(self.modalities, s, strict=True)
                                 for _ in range(len(t))], dtype=torch.int64)
        dev = tokens.device
        # Plain tensors out (ConditionTokens is built by `encode`): ZeRO-3 hooks a module's outputs to re-gather its
        # own parameters (the null and type embeddings) for backward, and cannot see inside a dataclass.
        return tokens, lengths.to(dev), pooled, modality.to(dev)


def _need(batch: Mapping[str, Any], key: str, modality: str) -> Any:
    if key not in batch or batch[key] is None:
        hint = " (run frozen_features first)" if key in FEATURE_KEYS.values() else ""
        raise KeyError(f"the {modality} condition needs batch[{key!r}]{hint}")
    return batch[key]


def _batch_size(batch: Mapping[str, Any]) -> int:
    for key in ("intrinsics", "rgb", "depth", "origin", "image_features", "semantic_features"):
        if batch.get(key) is not None:
            return int(batch[key].shape[0])
    if batch.get("layout_text") is not None:
        return len(batch["layout_text"])
    raise KeyError("cannot tell the batch size: the batch has none of intrinsics, rgb, depth, origin, layout_text")


def _cube_size(batch: Mapping[str, Any]) -> torch.Tensor:
    if batch.get("cube_size") is not None:
        return torch.as_tensor(batch["cube_size"]).reshape(-1)
    if batch.get("voxel_size") is not None and batch.get("resolution") is not None:
        return torch.as_tensor(batch["voxel_size"]).reshape(-1) * int(batch["resolution"])  # collate_scenes'
    raise KeyError("the conditions need batch['cube_size'] (or voxel_size and resolution)")


def _image_hw(batch: Mapping[str, Any]) -> tuple[int, int]:
    """The pixel size the intrinsics refer to: the view's own (before any resize to image_size)."""
    if batch.get("image_hw") is not None:
        h, w = batch["image_hw"]
        return int(h), int(w)
    for key in ("rgb", "depth"):
        if batch.get(key) is not None:
            return int(batch[key].shape[-2]), int(batch[key].shape[-1])
    raise KeyError("the camera condition needs batch['rgb'] or batch['depth'] (or image_hw) for the pixel size")
