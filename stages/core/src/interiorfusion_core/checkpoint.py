"""Training checkpoints stored through the ArtifactStore (`file://` or `s3://`), complete or absent.

Layout under a stage's output prefix (see docs/engine.md):

    checkpoints/
      step-00000100/
        model.safetensors          weights (plain runs; the final checkpoint of a ZeRO-3 run, consolidated)
        ema.safetensors            EMA weights, when training.ema is set
        optimizer.pt               optimizer.state_dict() (tensors and numbers only: loads with weights_only=True)
        scheduler.json             LR scheduler state
        rng/rank-00000.pt          python / numpy / torch / CUDA RNG states of each rank (weights_only-safe)
        data/rank-00000.json       each rank's data-loader position (its `state_dict()`) and epoch
        deepspeed/...              ZeRO shards as written by DeepSpeed's `save_checkpoint` (ZeRO runs only)
        checkpoint.json            the index: every file with size + sha256, step, epoch, best_val_loss, config
      latest                       {"step": 100, "dir": "step-00000100"}, written after the index

A checkpoint is complete when its `checkpoint.json` exists: files are written first, the index last, then the
`latest` pointer. Readers ignore directories without an index, and every file is verified against the sha256 in
the index before it is used.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from interiorfusion_core.errors import StorageError, UserError
from interiorfusion_core.storage import ArtifactStore, LocalStore, ObjectInfo

if TYPE_CHECKING:
    from interiorfusion_core.manifest import Manifest

CHECKPOINT_PREFIX = "checkpoints"
INDEX_NAME = "checkpoint.json"
LATEST_NAME = "latest"
FORMAT = "interiorfusion.checkpoint/1"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.json"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


def step_dir(step: int) -> str:
    return f"step-{step:08d}"


def rank_file(kind: str, rank: int, ext: str) -> str:
    return f"{kind}/rank-{rank:05d}.{ext}"


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete or does not fit the run that wants to load it."""


# ---------------------------------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as tensors/lists/numbers (so `torch.load(weights_only=True)` works)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in mt), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ---------------------------------------------------------------------------------------------- tensors on disk
def save_state_dict(
    state: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """safetensors refuses tensors that share storage (tied weights): those get their own copy."""
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        t = tensor.detach().to("cpu").contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (0, id(t))
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    save_file(out, str(path), metadata=metadata)


def load_state_dict(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device=str(device))


def save_torch(obj: Any, path: str | Path) -> None:
    torch.save(obj, str(path))


def load_torch(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    # Only tensors, numbers, strings and containers: never unpickle arbitrary objects from storage.
    return torch.load(str(path), map_location=map_location, weights_only=True)


# ---------------------------------------------------------------------------------------------- the store
@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint: its step, directory and index."""

    step: int
    dir: str
    prefix: str
    index: dict[str, Any]

    @property
    def key(self) -> str:
        """The checkpoint's key relative to the stage output (for `StageResult.outputs["checkpoint"]`)."""
        return f"{self.prefix}/{self.dir}" if self.prefix else self.dir

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.index["files"]

    def has(self, name: str) -> bool:
        return name in self.files


@dataclass
class CheckpointWriter:
    """Collects the files of one checkpoint being written (one writer per rank in distributed runs)."""

    store: ArtifactStore
    dir: str
    local: Path
    infos: list[ObjectInfo] = field(default_factory=list)

    def _key(self, name: str) -> str:
        return f"{self.dir}/{name}"

    def _record(self, name: str, info: ObjectInfo) -> ObjectInfo:
        rel = ObjectInfo(name, info.size, info.sha256)
        self.infos.append(rel)
        return rel

    def add_file(self, name: str, path: str | Path) -> ObjectInfo:
        return self._record(name, self.store.put_file(self._key(name), path))

    def add_bytes(self, name: str, data: bytes) -> ObjectInfo:
        return self._record(name, self.store.put_bytes(self._key(name), data))

    def add_json(self, name: str, obj: Any) -> ObjectInfo:
        return self.add_bytes(name, json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n")

    def _tmp(self, name: str) -> Path:
        p = self.local / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def add_state_dict(self, name: str, state: Mapping[str, torch.Tensor]) -> ObjectInfo:
        p = self._tmp(name)
        save_state_dict(state, p)
        try:
            return self.add_file(name, p)
        finally:
            p.unlink(missing_ok=True)

    def add_torch(self, name: str, obj: Any) -> ObjectInfo:
        p = self._tmp(name)
        save_torch(obj, p)
        try:
            return self.add_file(name, p)
        finally:
            p.unlink(missing_ok=True)

    def add_directory(self, name: str, directory: str | Path) -> list[ObjectInfo]:
        """Upload every file under a local directory (DeepSpeed's shard folder) below `name/`."""
        root = Path(directory)
        return [
            self.add_file(f"{name}/{p.relative_to(root).as_posix()}", p)
            for p in sorted(root.rglob("*")) if p.is_file()
        ]


class CheckpointManager:
    """Checkpoints under `<output>/checkpoints/`. Pass the stage's output store (ctx.output)."""

    def __init__(
        self,
        output: ArtifactStore,
        *,
        keep_last: int = 3,
        prefix: str = CHECKPOINT_PREFIX,
        work_dir: str | Path | None = None,
    ):
        self.output = output
        self.prefix = prefix
        self.store = output.child(prefix) if prefix else output
        self.keep_last = keep_last
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.gettempdir())

    # -------------------------------------------------------------------------------- reading
    def _dirs(self) -> dict[int, set[str]]:
        """step → names of the objects found in its directory (complete or not)."""
        found: dict[int, set[str]] = {}
        for key in self.store.list():
            head, _, rest = key.partition("/")
            m = _STEP_DIR.match(head)
            if m and rest:
                found.setdefault(int(m.group(1)), set()).add(rest)
        return found

    def steps(self, complete_only: bool = True) -> list[int]:
        dirs = self._dirs()
        return sorted(s for s, names in dirs.items() if not complete_only or INDEX_NAME in names)

    def get(self, step: int) -> CheckpointInfo:
        name = step_dir(step)
        key = f"{name}/{INDEX_NAME}"
        if not self.store.exists(key):
            raise CheckpointError(f"{self.store.uri_for(name)}: no complete checkpoint (its {INDEX_NAME} is missing)")
        index = self.store.get_json(key)
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise CheckpointError(f"{self.store.uri_for(key)}: not a {FORMAT} checkpoint index")
        return CheckpointInfo(step=int(index["step"]), dir=name, prefix=self.prefix, index=index)

    def latest(self) -> CheckpointInfo | None:
        """The newest complete checkpoint (directories without an index are ignored), or None."""
        steps = self.steps()
        return self.get(steps[-1]) if steps else None

    def fetch(self, info: CheckpointInfo, name: str, dest_dir: str | Path | None = None) -> Path:
        """A verified local path of one file of a checkpoint; ChecksumError names the key when the bytes differ."""
        entry = info.files.get(name)
        if entry is None:
            raise CheckpointError(f"{self.store.uri_for(info.dir)}: the checkpoint has no file '{name}'")
        key = f"{info.dir}/{name}"
        inner = getattr(self.store, "inner", self.store)
        if isinstance(inner, LocalStore):
            return self.store.open_local(key, entry["sha256"])  # verified in place, no copy
        dest = Path(dest_dir or self.work_dir / "ckpt-fetch" / info.dir) / name
        return self.store.get_file(key, dest, entry["sha256"])

    def read_bytes(self, info: CheckpointInfo, name: str) -> bytes:
        entry = info.files.get(name)
        if entry is None:
            raise CheckpointError(f"{self.store.uri_for(info.dir)}: the checkpoint has no file '{name}'")
        return self.store.get_bytes(f"{info.dir}/{name}", entry["sha256"])

    def read_json(self, info: CheckpointInfo, name: str) -> Any:
        return json.loads(self.read_bytes(info, name))

    def load_state_dict(self, info: CheckpointInfo, name: str = MODEL_FILE) -> dict[str, torch.Tensor]:
        return load_state_dict(self.fetch(info, name))

    def load_torch(self, info: CheckpointInfo, name: str) -> Any:
        return load_torch(self.fetch(info, name))

    def fetch_directory(self, info: CheckpointInfo, name: str, dest: str | Path,
                        keep: Any = None) -> Path:
        """Download (verified) the files of a sub-directory, e.g. the DeepSpeed shards; `keep(relpath)` filters."""
        dest = Path(dest)
        for rel, entry in sorted(info.files.items()):
            if not rel.startswith(f"{name}/"):
                continue
            sub = rel[len(name) + 1:]
            if keep is not None and not keep(sub):
                continue
            self.store.get_file(f"{info.dir}/{rel}", dest / sub, entry["sha256"])
        return dest

    # -------------------------------------------------------------------------------- writing
    def begin(self, step: int, *, clear: bool = True) -> CheckpointWriter:
        """Start writing checkpoint `step`. With `clear` (one rank only), a stale directory of that step (an
        interrupted write, or a checkpoint being replaced after a rollback) is deleted, index first."""
        name = step_dir(step)
        if clear:
            self._delete_dir(name)
        local = self.work_dir / "ckpt-write" / name
        local.mkdir(parents=True, exist_ok=True)
        return CheckpointWriter(self.store, name, local)

    def commit(self, step: int, files: Iterable[ObjectInfo], meta: Mapping[str, Any]) -> CheckpointInfo:
        """Write the index (this makes the checkpoint complete), then the `latest` pointer, then prune."""
        name = step_dir(step)
        index = {
            "format": FORMAT,
            "step": step,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            **{k: v for k, v in meta.items() if k not in ("format", "step", "files")},
            "files": {i.key: i.to_json() for i in sorted(files, key=lambda i: i.key)},
        }
        self.store.put_json(f"{name}/{INDEX_NAME}", index)
        self.store.put_json(LATEST_NAME, {"step": step, "dir": name})
        shutil.rmtree(self.work_dir / "ckpt-write" / name, ignore_errors=True)
        self.prune()
        return CheckpointInfo(step=step, dir=name, prefix=self.prefix, index=index)

    def add_to(self, info: CheckpointInfo, name: str, path: str | Path) -> CheckpointInfo:
        """Add a file to a complete checkpoint (e.g. the consolidated model of a ZeRO run) and rewrite its index."""
        obj = self.store.put_file(f"{info.dir}/{name}", path)
        index = dict(info.index)
        index["files"] = {**info.files, name: obj.to_json()}
        self.store.put_json(f"{info.dir}/{INDEX_NAME}", index)
        return CheckpointInfo(step=info.step, dir=info.dir, prefix=info.prefix, index=index)

    def _delete_dir(self, name: str) -> None:
        keys = list(self.store.list(name))
        index = f"{name}/{INDEX_NAME}"
        # Index first: a directory half-deleted is incomplete, never a complete checkpoint with holes.
        if index in keys:
            self.store.delete(index)
        for key in keys:
            if key != index:
                self.store.delete(key)

    def prune(self) -> list[int]:
        """Keep the newest `keep_last` complete checkpoints; drop older ones and stale incomplete directories."""
        dirs = self._dirs()
        complete = sorted(s for s, names in dirs.items() if INDEX_NAME in names)
        keep = set(complete[-self.keep_last:]) if self.keep_last > 0 else set(complete)
        newest = complete[-1] if complete else -1
        removed = []
        for s in sorted(dirs):
            stale = s not in keep and (s in complete or s < newest)
            if stale:
                self._delete_dir(step_dir(s))
                removed.append(s)
        return removed

    def record_into(self, info: CheckpointInfo) -> None:
        """Make the stage manifest list a checkpoint's files, including those written by other ranks or by an
        earlier (interrupted) run of the same stage."""
        record = getattr(self.output, "record", None)
        remember = getattr(self.store, "_remember", None)
        if record is None or remember is None:
            return
        for name, entry in info.files.items():
            remember(ObjectInfo(f"{info.dir}/{name}", entry["size"], entry["sha256"]))
        for key in (f"{info.dir}/{INDEX_NAME}", LATEST_NAME):
            with contextlib.suppress(StorageError):
                remember(self.store.stat(key))


# ---------------------------------------------------------------------------------------------- upstream stages
@dataclass(frozen=True)
class LoadedCheckpoint:
    """The checkpoint an upstream stage recorded as its `checkpoint` output, verified."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]  # the upstream run's resolved config (its manifest's `config`)
    step: int
    key: str  # the checkpoint's key under the upstream output, e.g. "checkpoints/step-00000080"
    uri: str  # where it was read from


def load_stage_checkpoint(
    upstream: Any, *, map_location: str | torch.device = "cpu", file: str = MODEL_FILE
) -> LoadedCheckpoint:
    """Load `file` (default model.safetensors) of the checkpoint a completed stage output names in
    `manifest.outputs["checkpoint"]`. `upstream` has `uri`, `manifest` and `store` (a `StageInput`).

    Verified end to end: the checkpoint's index is checked against the sha256 the manifest recorded; every file the
    index lists must be in the manifest with the same size and sha256; the loaded file's bytes are checked against
    both on download. Errors are one-sentence UserErrors (ChecksumError for changed bytes) naming the URI."""
    manifest: Manifest = upstream.manifest
    store: ArtifactStore = upstream.store
    key = manifest.outputs.get("checkpoint")
    if not key:
        raise UserError(f"{upstream.uri}: stage '{manifest.stage}' recorded no 'checkpoint' output, so there is no "
                        "checkpoint to load from it")
    where = store.uri_for(key)

    def recorded(name: str) -> str:
        entry = manifest.artifacts.get(f"{key}/{name}")
        if entry is None:
            raise UserError(f"{where}: the manifest of {upstream.uri} does not list '{name}' of its checkpoint")
        return entry.sha256

    index = store.get_json(f"{key}/{INDEX_NAME}", recorded(INDEX_NAME))
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("files"), dict):
        raise CheckpointError(f"{store.uri_for(f'{key}/{INDEX_NAME}')}: not a {FORMAT} checkpoint index")
    for name, entry in sorted(index["files"].items()):
        listed = manifest.artifacts.get(f"{key}/{name}")
        if listed is None or listed.sha256 != entry.get("sha256") or listed.size != entry.get("size"):
            raise CheckpointError(f"{where}: '{name}' is not the file the manifest of {upstream.uri} recorded "
                                  "(the checkpoint changed after the stage finished)")
    if file not in index["files"]:
        raise CheckpointError(f"{where}: the checkpoint has no '{file}'")
    sha = index["files"][file]["sha256"]
    with tempfile.TemporaryDirectory(prefix="interiorfusion-upstream-") as tmp:
        inner = getattr(store, "inner", store)
        path = (store.open_local(f"{key}/{file}", sha) if isinstance(inner, LocalStore)
                else store.get_file(f"{key}/{file}", Path(tmp) / file, sha))
        state = load_state_dict(path, map_location)  # safetensors: tensors only, never a pickle
    return LoadedCheckpoint(state_dict=state, config=dict(manifest.config), step=int(index["step"]), key=key,
                            uri=where)


# ---------------------------------------------------------------------------------------------- ZeRO export
def consolidate_zero_checkpoint(
    manager: CheckpointManager, info: CheckpointInfo | None = None, *, work_dir: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a ZeRO-2/3 checkpoint (DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint`
    over every rank's shards), on CPU. The shards are sha256-verified before DeepSpeed reads them."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    info = info or manager.latest()
    if info is None:
        raise CheckpointError(f"{manager.store.uri}: no complete checkpoint to consolidate")
    if not any(name.startswith(f"{DEEPSPEED_DIR}/") for name in info.files):
        raise CheckpointError(f"{manager.store.uri_for(info.dir)}: not a DeepSpeed checkpoint (no {DEEPSPEED_DIR}/)")
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="zero-consolidate-") as tmp:
        ds_dir = manager.fetch_directory(info, DEEPSPEED_DIR, Path(tmp) / DEEPSPEED_DIR)
        state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=DEEPSPEED_TAG)
        return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def export_model(manager: CheckpointManager, info: CheckpointInfo | None = None,
                 *, work_dir: str | Path | None = None) -> CheckpointInfo:
    """Make sure a checkpoint holds a single-file `model.safetensors` (consolidating ZeRO shards if needed)."""
    info = info or manager.latest()
    if info is None:
        raise CheckpointError(f"{manager.store.uri}: no complete checkpoint to export")
    if info.has(MODEL_FILE):
        return info
    state = consolidate_zero_checkpoint(manager, info, work_dir=work_dir)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="zero-export-") as tmp:
        path = Path(tmp) / MODEL_FILE
        save_state_dict(state, path, metadata={"step": str(info.step), "source": "zero-consolidated"})
        return manager.add_to(info, MODEL_FILE, path)


__all__ = [
    "CHECKPOINT_PREFIX",
    "DEEPSPEED_DIR",
    "DEEPSPEED_TAG",
    "EMA_FILE",
    "INDEX_NAME",
    "LATEST_NAME",
    "MODEL_FILE",
    "OPTIMIZER_FILE",
    "SCHEDULER_FILE",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointWriter",
    "LoadedCheckpoint",
    "capture_rng_state",
    "consolidate_zero_checkpoint",
    "export_model",
    "load_stage_checkpoint",
    "load_state_dict",
    "load_torch",
    "rank_file",
    "restore_rng_state",
    "save_state_dict",
    "save_torch",
    "seed_everything",
    "step_dir",
]
