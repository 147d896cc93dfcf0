"""What a stage is and gets: the `Stage` base class, the `StageContext` it runs in (config, verified inputs, the
recording output store, the tracker, rank), its `StageResult`. `contract.run_stage` builds the context and runs it;
`registry` finds Stage classes. Below both, so neither imports the other's module for these types."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from interiorfusion_core.config import LoadedConfig, StageConfig, StageSpec
from interiorfusion_core.errors import UserError
from interiorfusion_core.manifest import Manifest
from interiorfusion_core.storage import ArtifactStore, ObjectInfo
from interiorfusion_core.tracking import Tracker

if TYPE_CHECKING:  # checkpoint imports torch: stage types stay importable without it
    from interiorfusion_core.checkpoint import LoadedCheckpoint

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

    def remember(self, info: ObjectInfo) -> ObjectInfo:
        """Add an object another process wrote (a rank's shard, with the size and sha256 its put returned) to the
        manifest. Rank 0 alone writes the manifest, so the other ranks report what they wrote instead of rank 0
        listing the prefix, which could also pick up leftovers of an interrupted attempt."""
        return self._remember(info)

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

    def get_range(self, key: str, start: int, end: int) -> bytes:
        return self.inner.get_range(key, start, end)

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

    def load_input_checkpoint(self, name: str, map_location: Any = "cpu") -> LoadedCheckpoint:
        """The verified weights and resolved config of input `name`'s "checkpoint" output (see
        `checkpoint.load_stage_checkpoint`)."""
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
    """Subclass, set `config_model` (a schema whose `stage` spec names the stage and its inputs), implement `run`,
    register under `interiorfusion.stages`. Tests may set the attributes below by hand instead of a spec."""

    config_model: ClassVar[type[StageConfig]]
    name: ClassVar[str]
    config_kind: ClassVar[str]
    # Required inputs: input name → the stage that must have produced it.
    inputs: ClassVar[dict[str, str]] = {}
    optional_inputs: ClassVar[dict[str, str]] = {}
    description: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        spec = getattr(getattr(cls, "config_model", None), "stage", None)
        if isinstance(spec, StageSpec):
            cls.name, cls.config_kind, cls.description = spec.name, spec.config_kind, spec.description
            cls.inputs, cls.optional_inputs = dict(spec.inputs), dict(spec.optional_inputs)

    @classmethod
    def spec(cls) -> StageSpec:
        return StageSpec(cls.name, cls.config_kind, cls.inputs, cls.optional_inputs, cls.description)

    @abstractmethod
    def run(self, ctx: StageContext) -> StageResult: ...


__all__ = ["RUN_MARKER", "RecordingStore", "Stage", "StageContext", "StageInput", "StageResult"]
