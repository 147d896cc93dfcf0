"""The frozen-feature cache: a frozen encoder's output per image, computed once per dataset and resolution.

Layout under the caller's directory or prefix (conventionally `<stage work or output prefix>/feature_cache`):

    <encoder identity>/<variant>/<sha[:2]>/<sha>.safetensors

`identity` names the encoder and its weights digest (`FrozenImageEncoder.identity`), `variant` the resize and
compute dtype (`cache_variant`, e.g. "512px-bfloat16"), `sha` the sha256 of the input image (float32 bytes and
shape). One entry is a safetensors file with one tensor `features` [K, C] and metadata repeating the key and the
sha256 of the tensor bytes. Writes go through the store (LocalStore: temp file, fsync, rename; S3: one PUT), so a
crash never leaves a half entry under the final name; an entry that fails to parse or to match its checksum or
key is counted as corrupt, recomputed and overwritten, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from interiorfusion_core.errors import StorageError
from interiorfusion_core.storage import ArtifactStore, open_store

log = logging.getLogger("interiorfusion_structure")

FORMAT = "interiorfusion.feature/1"


def image_digest(image: torch.Tensor) -> str:
    """sha256 of one image [3, H, W] as float32 bytes plus its shape (the same pixels give the same key)."""
    x = image.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(f"{tuple(x.shape)}\n".encode())
    h.update(x.numpy().data)
    return h.hexdigest()


def _tensor_sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().data).hexdigest()


def _metadata(data: bytes) -> dict[str, str]:
    # safetensors: 8-byte little-endian header length, then a JSON header holding __metadata__.
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8: 8 + n])["__metadata__"]


class FeatureCache:
    """One frozen encoder's features by image. `features(images, compute, variant)` is the usual entry point:
    hits are read, misses computed in one call of `compute` and stored. `hits`, `misses`, `corrupt` count."""

    def __init__(self, store: ArtifactStore | str | Path, identity: str) -> None:
        self.store = store if isinstance(store, ArtifactStore) else open_store(store)
        self.identity = identity
        self.hits = self.misses = self.corrupt = 0

    def key(self, digest: str, variant: str) -> str:
        return f"{self.identity}/{variant}/{digest[:2]}/{digest}.safetensors"

    def get(self, digest: str, variant: str) -> torch.Tensor | None:
        """The cached features of the image with this digest, or None (absent or corrupt)."""
        key = self.key(digest, variant)
        try:
            data = self.store.get_bytes(key)
        except StorageError:
            return None
        try:
            meta = _metadata(data)
            feats = st_load(data)["features"]
            expected = {"format": FORMAT, "identity": self.identity, "variant": variant, "image": digest}
            if any(meta.get(k) != v for k, v in expected.items()) or meta.get("sha256") != _tensor_sha(feats):
                raise ValueError("key or checksum mismatch")
        except Exception as exc:  # any parse failure means the bytes are not a complete entry
            self.corrupt += 1
            log.warning("feature cache: %s is corrupt (%s: %s); recomputing it", self.store.uri_for(key),
                        type(exc).__name__, exc)
            return None
        return feats

    def put(self, digest: str, variant: str, features: torch.Tensor) -> None:
        feats = features.detach().to("cpu").contiguous()
        meta = {"format": FORMAT, "identity": self.identity, "variant": variant, "image": digest,
                "sha256": _tensor_sha(feats), "shape": json.dumps(list(feats.shape))}
        self.store.put_bytes(self.key(digest, variant), st_save({"features": feats}, metadata=meta))

    def get_many(self, images: torch.Tensor, variant: str) -> list[torch.Tensor | None]:
        return [self.get(image_digest(img), variant) for img in images]

    def put_many(self, images: torch.Tensor, features: torch.Tensor, variant: str) -> None:
        for img, f in zip(images, features, strict=True):
            self.put(image_digest(img), variant, f)

    def features(self, images: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor],
                 variant: str) -> torch.Tensor:
        """[B, K, C] for images [B, 3, H, W], on the images' device: cached rows read, the rest computed."""
        digests = [image_digest(img) for img in images]
        found = [self.get(d, variant) for d in digests]
        missing = [i for i, f in enumerate(found) if f is None]
        self.hits += len(digests) - len(missing)
        self.misses += len(missing)
        if missing:
            computed = compute(images[missing])
            for j, i in enumerate(missing):
                self.put(digests[i], variant, computed[j])
                found[i] = computed[j]
        return torch.stack([f.to(images.device) for f in found])  # type: ignore[union-attr]

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "corrupt": self.corrupt}


def open_feature_caches(store: ArtifactStore | str | Path, frozen: Mapping[str, Any]) -> dict[str, FeatureCache]:
    """One FeatureCache per frozen encoder (modality → cache) under `store`, keyed by the encoder's identity."""
    root = store if isinstance(store, ArtifactStore) else open_store(store)
    return {name: FeatureCache(root, enc.identity) for name, enc in frozen.items()}
