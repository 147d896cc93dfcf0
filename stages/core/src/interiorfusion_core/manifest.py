"""The manifest: what a completed stage run produced. Written last; its presence means "complete"."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from interiorfusion_core.errors import IncompleteArtifactError, StorageError, UserError
from interiorfusion_core.storage import ArtifactStore, ObjectInfo, open_store

MANIFEST_KEY = "manifest.json"
MANIFEST_FORMAT = "interiorfusion.manifest/2"
# /1 manifests (digest over every field, timestamps included) still read; their digest is computed the /2 way.
READABLE_FORMATS = ("interiorfusion.manifest/1", MANIFEST_FORMAT)


class ArtifactEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int
    sha256: str


class InputRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uri: str
    stage: str
    digest: str


class Manifest(BaseModel):
    """Format `interiorfusion.manifest/2`; documented in the README ("Stage contract")."""

    model_config = ConfigDict(extra="forbid")
    format: str = MANIFEST_FORMAT
    stage: str
    cache_key: str
    config_kind: str
    config_digest: str
    config: dict[str, Any]
    inputs: dict[str, InputRef] = Field(default_factory=dict)
    artifacts: dict[str, ArtifactEntry] = Field(default_factory=dict)
    # Named entry points into the artifacts, e.g. {"checkpoint": "checkpoints/step-00000100"}.
    outputs: dict[str, str] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    code_version: dict[str, str] = Field(default_factory=dict)
    mlflow_run_id: str | None = None
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def content(self) -> dict[str, Any]:
        """What the run produced from what: stage, config, input digests, artifacts' sha256, named outputs. Not
        when, where or by which run (timestamps, URIs, MLflow ids, code versions, timings), so a forced rerun of a
        deterministic stage has the same content and leaves every downstream cache key unchanged."""
        return {
            "stage": self.stage,
            "config_kind": self.config_kind,
            "config_digest": self.config_digest,
            "inputs": {n: {"stage": i.stage, "digest": i.digest} for n, i in sorted(self.inputs.items())},
            "artifacts": {k: [a.size, a.sha256] for k, a in sorted(self.artifacts.items())},
            "outputs": dict(sorted(self.outputs.items())),
        }

    def canonical_bytes(self) -> bytes:
        return json.dumps(self.content(), sort_keys=True, separators=(",", ":")).encode()

    @property
    def digest(self) -> str:
        """sha256 of `content()`: what downstream cache keys hash."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    def add(self, info: ObjectInfo) -> None:
        self.artifacts[info.key] = ArtifactEntry(size=info.size, sha256=info.sha256)


def cache_key(stage: str, config_digest: str, input_digests: dict[str, str]) -> str:
    payload = json.dumps(
        {"stage": stage, "config": config_digest, "inputs": dict(sorted(input_digests.items()))},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def read_manifest(store_or_uri: ArtifactStore | str) -> Manifest:
    """The manifest at a prefix; a prefix without one is incomplete and refused."""
    store = open_store(store_or_uri) if isinstance(store_or_uri, str) else store_or_uri
    try:
        exists = store.exists(MANIFEST_KEY)
    except StorageError:
        raise
    if not exists:
        raise IncompleteArtifactError(
            f"{store.uri}: no {MANIFEST_KEY} here, so this is not a completed stage output "
            "(the stage never ran here, or it did not finish)"
        )
    raw = store.get_json(MANIFEST_KEY)
    if isinstance(raw, dict) and raw.get("format") not in READABLE_FORMATS:
        raise UserError(f"{store.uri_for(MANIFEST_KEY)}: manifest format {raw.get('format')!r} is not one this "
                        f"version reads ({', '.join(READABLE_FORMATS)})")
    try:
        return Manifest.model_validate(raw)
    except Exception as exc:
        raise UserError(f"{store.uri_for(MANIFEST_KEY)}: not a valid manifest ({exc.__class__.__name__})") from None


def try_read_manifest(store: ArtifactStore) -> Manifest | None:
    try:
        return read_manifest(store)
    except IncompleteArtifactError:
        return None
