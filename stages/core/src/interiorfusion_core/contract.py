"""The one stage contract: (stage, resolved config, input manifests) → output prefix + manifest.json (last).

    run_stage("vae", "configs/smoke/vae.yaml", inputs={"data": uri}, output=uri)

- Inputs are prefixes holding a manifest; a prefix without one is refused.
- The cache key is sha256(stage, config digest, input manifest digests). An output whose manifest has the same
  key is not run again (unless `force`); an output holding a *different* completed run is never overwritten
  unless `force` (a completed artifact is never lost by accident).
- An output without a manifest but with `_run.json` is an interrupted run: rerunning the same command resumes
  it (stages resume from their latest checkpoint under the prefix); `restart` wipes it first. An interrupted
  run of a different config is refused rather than mixed with this one.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import distributions
from pathlib import Path
from typing import Any, ClassVar

from interiorfusion_core.config import LoadedConfig, load_config
from interiorfusion_core.config.schemas import StageConfig
from interiorfusion_core.errors import UserError
from interiorfusion_core.manifest import (
    MANIFEST_KEY,
    InputRef,
    Manifest,
    cache_key,
    read_manifest,
    try_read_manifest,
)
from interiorfusion_core.registry import get_stage
from interiorfusion_core.state import distributed_rank
from interiorfusion_core.storage import ArtifactStore, ObjectInfo, open_store
from interiorfusion_core.tracking import NullTracker, Tracker

RUN_MARKER = "_run.json"


class RecordingStore(ArtifactStore):
    """Wraps the output store and remembers what this run wrote, for the manifest."""

    def __init__(self, inner: ArtifactStore, record: dict[str, ObjectInfo] | None = None, base: str = ""):
        self.inner = inner
        self.record = record if record is not None else {}
        self.base = base

    def _full(self, key: str) -> str:
        return f"{self.base}/{key}" if self.base else key

    @property
    def uri(self) -> str:
        return self.inner.uri

    def child(self, prefix: str) -> RecordingStore:
        return RecordingStore(self.inner.child(prefix), self.record, self._full(prefix))

    def _remember(self, info: ObjectInfo) -> ObjectInfo:
        full = ObjectInfo(self._full(info.key), info.size, info.sha256)
        self.record[full.key] = full
        return info

    def put_file(self, key: str, path: str | Path) -> ObjectInfo:
        return self._remember(self.inner.put_file(key, path))

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return self._remember(self.inner.put_bytes(key, data))

    def adopt(self, key: str) -> ObjectInfo:
        """Add an object that already exists (written before a resume) to the manifest."""
        return self._remember(self.inner.stat(key))

    def get_file(self, key: str, path: str | Path, sha256: str | None = None) -> Path:
        return self.inner.get_file(key, path, sha256)

    def get_bytes(self, key: str, sha256: str | None = None) -> bytes:
        return self.inner.get_bytes(key, sha256)

    def open_local(self, key: str, sha256: str | None = None) -> Path:
        return self.inner.open_local(key, sha256)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def stat(self, key: str) -> ObjectInfo:
        return self.inner.stat(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)
        self.record.pop(self._full(key), None)


@dataclass
class StageInput:
    name: str
    uri: str
    manifest: Manifest
    store: ArtifactStore

    def open(self, key: str) -> Path:
        """A verified local copy of one of this input's artifacts."""
        entry = self.manifest.artifacts.get(key)
        if entry is None:
            raise UserError(f"{self.uri}: its manifest lists no artifact '{key}'")
        return self.store.open_local(key, entry.sha256)

    def read_bytes(self, key: str) -> bytes:
        entry = self.manifest.artifacts.get(key)
        if entry is None:
            raise UserError(f"{self.uri}: its manifest lists no artifact '{key}'")
        return self.store.get_bytes(key, entry.sha256)


@dataclass
class StageContext:
    stage: str
    loaded: LoadedConfig
    inputs: dict[str, StageInput]
    output: RecordingStore
    tracker: Tracker
    cache_key: str
    work_dir: Path
    rank: int = 0
    world_size: int = 1
    resumed: bool = False

    @property
    def config(self) -> Any:
        return self.loaded.model

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def load_input_checkpoint(self, name: str, map_location: Any = "cpu") -> Any:
        """The verified weights and resolved config of input `name`'s "checkpoint" output: a
        `checkpoint.LoadedCheckpoint` (see `checkpoint.load_stage_checkpoint`)."""
        from interiorfusion_core.checkpoint import load_stage_checkpoint

        if name not in self.inputs:
            raise UserError(f"stage '{self.stage}' got no input '{name}' (inputs: {', '.join(self.inputs) or 'none'})")
        return load_stage_checkpoint(self.inputs[name], map_location=map_location)


@dataclass
class StageResult:
    metrics: dict[str, float] = field(default_factory=dict)
    # Named entry points into the artifacts (e.g. "checkpoint" → "checkpoints/step-00000100").
    outputs: dict[str, str] = field(default_factory=dict)


class Stage(ABC):
    """Subclass, set the class attributes, implement `run`, register under `interiorfusion.stages`."""

    name: ClassVar[str]
    config_kind: ClassVar[str]
    # None: the config kind is one of core's seed kinds (CONFIG_KINDS).
    config_model: ClassVar[type[StageConfig] | None] = None
    # Required inputs: input name → the stage that must have produced it.
    inputs: ClassVar[dict[str, str]] = {}
    optional_inputs: ClassVar[dict[str, str]] = {}
    description: ClassVar[str] = ""

    @abstractmethod
    def run(self, ctx: StageContext) -> StageResult: ...


@dataclass
class RunOutcome:
    manifest: Manifest
    uri: str
    skipped: bool


def code_version() -> dict[str, str]:
    versions = {
        d.metadata["Name"]: d.version
        for d in distributions()
        if (d.metadata["Name"] or "").startswith("interiorfusion")
    }
    sha = os.environ.get("INTERIORFUSION_GIT_SHA")
    if not sha:
        try:
            sha = subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                cwd=Path(__file__).parent,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            sha = ""
    if sha:
        versions["git"] = sha
    return dict(sorted(versions.items()))


def resolve_inputs(stage_cls: type[Stage], inputs: Mapping[str, str]) -> dict[str, StageInput]:
    known = {**stage_cls.inputs, **stage_cls.optional_inputs}
    for name in inputs:
        if name not in known:
            listed = ", ".join(known) or "none"
            raise UserError(f"stage '{stage_cls.name}' takes no input named '{name}' (its inputs: {listed})")
    for name in stage_cls.inputs:
        if name not in inputs:
            raise UserError(
                f"stage '{stage_cls.name}' needs --input {name}=URI (the output of stage '{stage_cls.inputs[name]}')"
            )
    resolved = {}
    for name, uri in inputs.items():
        store = open_store(uri)
        manifest = read_manifest(store)
        if manifest.stage != known[name]:
            raise UserError(
                f"{uri}: input '{name}' must be an output of stage '{known[name]}', but it came from '{manifest.stage}'"
            )
        resolved[name] = StageInput(name, uri, manifest, store)
    return resolved


def prepare_output(store: ArtifactStore, key: str, *, force: bool, restart: bool) -> tuple[Manifest | None, bool]:
    """Decide what to do with an output prefix. Returns (cached manifest or None, resuming?)."""
    existing = try_read_manifest(store)
    if existing is not None:
        if existing.cache_key == key and not force:
            return existing, False
        if not force:
            raise UserError(
                f"{store.uri}: already holds a completed run of stage '{existing.stage}' with another config or "
                "inputs; write to a new --output, or pass --force to replace it"
            )
    marker = store.get_json(RUN_MARKER) if store.exists(RUN_MARKER) else None
    if force or restart:
        # Manifest first, so an interruption while wiping leaves an incomplete prefix, never a stale complete one.
        if store.exists(MANIFEST_KEY):
            store.delete(MANIFEST_KEY)
        store.delete_prefix("")
        return None, False
    if marker is not None and marker.get("cache_key") != key:
        raise UserError(
            f"{store.uri}: holds an unfinished run with another config or inputs; pass --restart to discard it "
            "or write to a new --output"
        )
    return None, marker is not None


def run_stage(
    stage: str,
    config: str | Path | LoadedConfig,
    *,
    inputs: Mapping[str, str] | None = None,
    output: str,
    overrides: list[str] | tuple[str, ...] = (),
    force: bool = False,
    restart: bool = False,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> RunOutcome:
    stage_cls = get_stage(stage)
    loaded = config if isinstance(config, LoadedConfig) else load_config(config, overrides, stage_cls.config_kind)
    if loaded.kind != stage_cls.config_kind:
        raise UserError(f"{loaded.path}: is a '{loaded.kind}' config; stage '{stage}' needs '{stage_cls.config_kind}'")
    resolved_inputs = resolve_inputs(stage_cls, inputs or {})
    key = cache_key(stage, loaded.digest, {n: i.manifest.digest for n, i in resolved_inputs.items()})
    rank, world = distributed_rank()
    out_store = open_store(output)

    if rank == 0:
        cached, resuming = prepare_output(out_store, key, force=force, restart=restart)
        if cached is not None:
            return RunOutcome(cached, out_store.uri, skipped=True)
        out_store.put_json(RUN_MARKER, {"stage": stage, "cache_key": key, "config_digest": loaded.digest})
    else:
        resuming = out_store.exists(RUN_MARKER)

    parent = parent_run_id or os.environ.get("INTERIORFUSION_PARENT_RUN_ID")
    tracker: Tracker = (
        Tracker(
            stage,
            parent_run_id=parent,
            tags={"interiorfusion.stage": stage, "interiorfusion.cache_key": key, **(tags or {})},
        )
        if rank == 0
        else NullTracker()
    )
    status = "FAILED"
    try:
        tracker.log_config(loaded.resolved)
        tracker.set_tags(
            {"interiorfusion.output": out_store.uri, "interiorfusion.resumed": str(resuming)}
            | {f"interiorfusion.input.{n}": i.uri for n, i in resolved_inputs.items()}
        )
        with tempfile.TemporaryDirectory(prefix=f"interiorfusion-{stage}-") as work:
            ctx = StageContext(
                stage=stage, loaded=loaded, inputs=resolved_inputs, output=RecordingStore(out_store),
                tracker=tracker, cache_key=key, work_dir=Path(work), rank=rank, world_size=world,
                resumed=resuming,
            )
            started = time.perf_counter()
            result = get_stage(stage)().run(ctx)
            result.metrics.setdefault("stage_seconds", time.perf_counter() - started)
        manifest = Manifest(
            stage=stage, cache_key=key, config_kind=loaded.kind, config_digest=loaded.digest,
            config=loaded.resolved,
            inputs={n: InputRef(uri=i.uri, stage=i.manifest.stage, digest=i.manifest.digest)
                    for n, i in resolved_inputs.items()},
            outputs=result.outputs, metrics=result.metrics, code_version=code_version(),
            mlflow_run_id=tracker.run_id,
        )
        for info in sorted(ctx.output.record.values(), key=lambda i: i.key):
            if info.key != RUN_MARKER:
                manifest.add(info)
        if rank == 0:
            if result.metrics:
                tracker.log_metrics({f"final/{k}": v for k, v in result.metrics.items()}, step=0)
            tracker.set_tags({f"interiorfusion.output.{k}": out_store.uri_for(v) for k, v in result.outputs.items()})
            out_store.put_bytes(MANIFEST_KEY, manifest.model_dump_json(indent=2).encode() + b"\n")
            out_store.delete(RUN_MARKER)
            tracker.log_dict(manifest.model_dump(mode="json"), "manifest.json")
        status = "FINISHED"
        return RunOutcome(manifest, out_store.uri, skipped=False)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end(status)
