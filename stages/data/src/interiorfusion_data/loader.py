"""Streaming loader over scene shards: deterministic, rank-split, resumable at sample granularity.

    ds = open_dataset("s3://bucket/runs/data", split="train")          # reads dataset.json + shard indexes
    loader = SceneLoader(ds, batch_size=8, resolution=64, num_workers=4, seed=0, rank=r, world_size=w)
    loader.load_state_dict(saved)                                         # optional: resume mid-epoch
    for epoch in range(start, n):
        loader.set_epoch(epoch)
        for batch in loader: ...                                          # collated sparse batches
        saved = loader.state_dict()                                       # {"epoch", "consumed", ...}

Order: epoch e visits a permutation of the split drawn from (seed, e); rank r takes every world_size-th sample
of it (disjoint ranks, equal lengths by default). That sequence is cut into batches; DataLoader worker w builds
batches w, w + W, w + 2W, … and torch hands them out round-robin, so the consumer sees exactly the sequence,
whatever the worker count. Each batch says where it ends in the sequence; the loader's cursor is the end of the
last batch it yielded, so `state_dict()` after any batch resumes at the next sample.

Read-ahead: each worker fetches the raw bytes of its next `read_ahead` samples (one ranged read each, checksum
verified) on a few threads while it decodes the current one, so an object store's per-request latency overlaps
the decoding instead of adding to it. Batches are the same with any read_ahead (0: fetch, then decode, in turn).

Corrupt samples (bad checksum, truncated shard, undecodable member) are skipped, logged by name and counted;
when more than `max_corrupt_fraction` of the epoch's samples are corrupt, iteration stops with a UserError.
Samples without voxel labels (version-1 shards, unlabelled imports) are read with labels "unknown" and counted
(`data/samples_without_labels`). Samples without stored shading lights (written before lights were stored) are
counted too (`data/samples_without_lights`); `has_lights` marks them in a batch.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from interiorfusion_core.errors import StorageError, UserError
from interiorfusion_core.manifest import MANIFEST_KEY, read_manifest
from interiorfusion_core.state import distributed_rank
from interiorfusion_core.storage import ArtifactStore, open_store
from interiorfusion_data.format import DATASET_FORMAT, SampleError, decode_sample
from interiorfusion_data.scene import CLASSES
from interiorfusion_data.shards import sample_members

log = logging.getLogger("interiorfusion_data")
STATE_FORMAT = 1
ALL_FIELDS = ("voxels", "views", "layout")
READ_AHEAD_THREADS = 4  # per worker: enough requests in flight to hide an object store's latency


@dataclass(frozen=True)
class SampleRef:
    shard: str
    key: str
    offset: int
    size: int
    sha256: str

    @property
    def name(self) -> str:
        return f"{self.shard}:{self.key}"


class SceneDataset:
    """One split of a written dataset: the sample index, and random access to decoded samples."""

    def __init__(self, store: ArtifactStore, split: str, dataset: dict[str, Any], refs: list[SampleRef]):
        self.store = store
        self.split = split
        self.info = dataset
        self.refs = refs

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def uri(self) -> str:
        return self.store.uri

    @property
    def classes(self) -> list[str]:
        """Class names by id. Ids are append-only, so an older dataset's list is a prefix of today's table, which
        is returned then (a version-1 dataset's voxels read as "unknown", an id its own list does not have)."""
        stored = list(self.info["classes"])
        return list(CLASSES) if stored == list(CLASSES[: len(stored)]) else stored

    def members(self, i: int) -> dict[str, bytes]:
        """The raw members of sample i, verified against the index (SampleError when corrupt)."""
        ref = self.refs[i]
        try:
            data = self.store.get_range(ref.shard, ref.offset, ref.offset + ref.size)
        except StorageError:
            if self.store.exists(ref.shard):
                raise  # the server, not the sample (unreachable, auth): fail loudly, don't count it as corrupt
            raise SampleError(f"{ref.name}: the shard is missing") from None
        if len(data) != ref.size:
            raise SampleError(f"{ref.name}: truncated ({len(data)} of {ref.size} bytes)")
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise SampleError(f"{ref.name}: sha256 mismatch (the shard is corrupt)")
        return sample_members(data, ref.key, ref.name)

    def get(self, i: int, resolution: int | None = None, fields: Sequence[str] = ALL_FIELDS,
            views: list[int] | int | None = None, view_seed: tuple[int, ...] | None = None) -> dict[str, Any]:
        """Decoded sample i (see format.decode_sample); `views`: None (all), a list, or a count K (the first K,
        or K drawn deterministically from `view_seed`)."""
        return self.decode(i, self.members(i), resolution, fields, views, view_seed)

    def decode(self, i: int, members: dict[str, bytes], resolution: int | None = None,
               fields: Sequence[str] = ALL_FIELDS, views: list[int] | int | None = None,
               view_seed: tuple[int, ...] | None = None) -> dict[str, Any]:
        """Sample i decoded from its raw `members` (what `members(i)` returned; `get` is both in turn)."""
        ref = self.refs[i]
        try:
            return decode_sample(members, resolution, tuple(fields), views, view_seed)
        except SampleError as exc:
            msg = str(exc)
            raise SampleError(msg if msg.startswith(ref.shard) else f"{ref.name}: {msg}") from None
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise SampleError(f"{ref.name}: undecodable ({type(exc).__name__}: {exc})") from None


def open_dataset(uri: str | ArtifactStore, split: str = "train", require_manifest: bool = True) -> SceneDataset:
    """Open one split of a data-stage output (`s3://…`, `file://…` or a path).

    With a manifest (a completed stage run), dataset.json and every shard index are verified against the
    sha256 it recorded. `require_manifest=False` also opens a folder written by `interiorfusion data synth`."""
    store = open_store(uri) if not isinstance(uri, ArtifactStore) else uri
    artifacts: dict[str, str] = {}
    if store.exists(MANIFEST_KEY):
        manifest = read_manifest(store)
        if manifest.stage != "data":
            raise UserError(f"{store.uri}: is an output of stage '{manifest.stage}', not of the data stage")
        artifacts = {k: v.sha256 for k, v in manifest.artifacts.items()}
    elif require_manifest:
        read_manifest(store)  # raises the standard "incomplete output" error
    if not store.exists("dataset.json"):
        raise UserError(f"{store.uri}: no dataset.json here, so this is not a scene dataset")
    dataset = store.get_json("dataset.json", artifacts.get("dataset.json"))
    if not isinstance(dataset, dict) or dataset.get("format") != DATASET_FORMAT:
        raise UserError(f"{store.uri_for('dataset.json')}: not a {DATASET_FORMAT} file")
    if split not in dataset.get("splits", {}):
        raise UserError(f"{store.uri}: no split '{split}' (splits: {', '.join(dataset.get('splits', {}))})")
    shards = dataset["splits"][split]["shards"]

    def load_index(entry: dict[str, Any]) -> dict[str, Any]:
        return store.get_json(entry["index"], artifacts.get(entry["index"]))

    with ThreadPoolExecutor(8) as pool:
        indexes = list(pool.map(load_index, shards))
    refs = [SampleRef(entry["shard"], s["key"], int(s["offset"]), int(s["size"]), s["sha256"])
            for entry, idx in zip(shards, indexes, strict=True) for s in idx["samples"]]
    return SceneDataset(store, split, dataset, refs)


# ---------------------------------------------------------------------------------------------- collate
def collate_scenes(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch decoded samples. Sparse voxels are concatenated with the batch index as the first coordinate:
    `coords` (ΣM, 4) int32 [b, x, y, z], `feats` (ΣM, 8) float32, `labels` / `instances` (ΣM,) int64,
    `has_labels` (B,) bool (False: the sample's labels are all "unknown"), `num_voxels` (B,). Views are stacked:
    `rgb` (B, V, 3, H, W) float32 in [0, 1], `depth` (B, V, H, W) metres, `normal` (B, V, 3, H, W),
    `semantic`/`instance` (B, V, H, W) int64, `intrinsics` (B, V, 3, 3), `cam_to_world` (B, V, 4, 4).
    Boxes: `boxes` (ΣK, 9) [b, cx, cy, cz, sx, sy, sz, yaw, class_id]; `layout_text` / `layout` lists.
    Lights: `lights` (B, Lmax, 4) float32 [x, y, z, intensity] zero-padded, `num_lights` (B,) int64, `has_lights`
    (B,) bool (False: the sample stores none and shading consumers should skip it). Present flags: `has_materials`,
    `has_layout` (False for real scans: no PBR materials, no wall/floor polygon) and `has_captured_frames` (True:
    the views' colour and depth are a camera's real frames, not renders) (B,) bool."""
    out: dict[str, Any] = {"keys": [s["key"] for s in samples]}
    if not samples:
        return out
    if "present" in samples[0]:
        # What real scans lack (absent flags: procedural defaults): losses needing it skip those samples.
        flags = [s.get("present", {}) for s in samples]
        out["has_captured_frames"] = torch.tensor([bool(f.get("captured_frames", False)) for f in flags])
        out["has_materials"] = torch.tensor([bool(f.get("materials", True)) for f in flags])
        out["has_layout"] = torch.tensor([bool(f.get("layout", True)) for f in flags])
    first = samples[0]
    if "lights" in first:
        counts = [len(s["lights"]) for s in samples]
        lights = torch.zeros((len(samples), max(counts), 4), dtype=torch.float32)
        for b, s in enumerate(samples):
            lights[b, :counts[b]] = torch.from_numpy(np.asarray(s["lights"], np.float32).reshape(-1, 4))
        out["lights"] = lights
        out["num_lights"] = torch.tensor(counts, dtype=torch.int64)
        out["has_lights"] = torch.tensor([bool(s.get("present", {}).get("lights")) for s in samples])
    if "coords" in first:
        coords, feats = [], []
        for b, s in enumerate(samples):
            c = torch.from_numpy(s["coords"].astype(np.int32))
            coords.append(torch.cat([torch.full((len(c), 1), b, dtype=torch.int32), c], dim=1))
            feats.append(torch.from_numpy(s["feats"]))
        out["coords"] = torch.cat(coords)
        out["feats"] = torch.cat(feats)
        if "labels" in first:
            out["labels"] = torch.cat([torch.from_numpy(s["labels"].astype(np.int64)) for s in samples])
            out["instances"] = torch.cat([torch.from_numpy(s["instances"].astype(np.int64)) for s in samples])
            out["has_labels"] = torch.tensor([bool(s.get("present", {}).get("voxel_labels")) for s in samples])
        out["num_voxels"] = torch.tensor([len(s["coords"]) for s in samples], dtype=torch.int64)
        out["resolution"] = int(first["resolution"])
        out["origin"] = torch.from_numpy(np.stack([s["origin"] for s in samples]))
        out["voxel_size"] = torch.tensor([float(s["voxel_size"]) for s in samples], dtype=torch.float32)
    if "rgb" in first:
        shapes = {s["rgb"].shape for s in samples}
        if len(shapes) > 1:
            raise ValueError(f"samples have different view stacks {sorted(shapes)}; pass views=K to the loader")
        out["rgb"] = torch.from_numpy(np.stack([s["rgb"] for s in samples])).permute(0, 1, 4, 2, 3).float() / 255.0
        out["depth"] = torch.from_numpy(np.stack([s["depth"] for s in samples]))
        out["normal"] = torch.from_numpy(np.stack([s["normal"] for s in samples])).permute(0, 1, 4, 2, 3).contiguous()
        out["semantic"] = torch.from_numpy(np.stack([s["semantic"] for s in samples]))
        out["instance"] = torch.from_numpy(np.stack([s["instance"] for s in samples]))
        out["intrinsics"] = torch.from_numpy(np.stack([s["intrinsics"] for s in samples]))
        out["cam_to_world"] = torch.from_numpy(np.stack([s["cam_to_world"] for s in samples]))
    if "boxes" in first:
        boxes = [torch.cat([torch.full((len(s["boxes"]), 1), float(b)), torch.from_numpy(s["boxes"])], dim=1)
                 for b, s in enumerate(samples)]
        out["boxes"] = torch.cat(boxes) if boxes else torch.zeros((0, 9))
        out["layout_text"] = [s["layout_text"] for s in samples]
        out["layout"] = [s["layout"] for s in samples]
    return out


# ---------------------------------------------------------------------------------------------- iteration
class _BatchStream(IterableDataset):
    """What DataLoader workers iterate: batches b ≡ worker id (mod workers) of a fixed position list."""

    def __init__(self, dataset: SceneDataset, positions: list[int], start: int, batch_size: int, drop_last: bool,
                 resolution: int | None, fields: tuple[str, ...], views: int | None, view_seed: tuple[int, ...] | None,
                 read_ahead: int = 0):
        self.dataset = dataset
        self.read_ahead = read_ahead
        self.positions = positions
        self.start = start
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.resolution = resolution
        self.fields = fields
        self.views = views
        self.view_seed = view_seed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        n = len(self.positions)
        n_batches = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        mine = list(range(wid, n_batches, nw))
        spans = [self.positions[b * self.batch_size:(b + 1) * self.batch_size] for b in mine]
        fetched = self._fetch([pos for span in spans for pos in span])
        for b, span in zip(mine, spans, strict=True):
            samples, corrupt = [], []
            for pos in span:
                try:
                    seed = (*self.view_seed, pos) if self.view_seed is not None else None
                    samples.append(self.dataset.decode(pos, next(fetched)(), self.resolution, self.fields,
                                                       self.views, seed))
                except SampleError as exc:
                    log.warning("skipping corrupt sample %s", exc)
                    corrupt.append(str(exc))
            batch = collate_scenes(samples)
            unlabelled = sum(1 for s in samples if not s.get("present", {}).get("voxel_labels"))
            unlit = sum(1 for s in samples if not s.get("present", {}).get("lights"))
            no_layout = sum(1 for s in samples if not s.get("present", {}).get("layout", True))
            no_materials = sum(1 for s in samples if not s.get("present", {}).get("materials", True))
            batch["_cursor"] = {"end": self.start + min((b + 1) * self.batch_size, n), "corrupt": corrupt,
                                "count": len(samples), "unlabelled": unlabelled, "unlit": unlit,
                                "no_layout": no_layout, "no_materials": no_materials}
            yield batch

    def _fetch(self, order: list[int]) -> Iterator[Any]:
        """For each position of `order` in turn, a callable returning its raw members (or raising what
        `members` raised, in the consumer's thread). With read-ahead, up to `read_ahead` of them are in flight on
        a thread pool: ranged reads and sha256 release the GIL, so they overlap the consumer's decoding."""
        if self.read_ahead <= 0:
            for pos in order:
                yield lambda pos=pos: self.dataset.members(pos)
            return
        with ThreadPoolExecutor(max_workers=min(self.read_ahead, READ_AHEAD_THREADS),
                                thread_name_prefix="shard-read-ahead") as pool:
            todo = iter(order)
            pending: deque[Future[dict[str, bytes]]] = deque(
                pool.submit(self.dataset.members, pos) for pos in itertools.islice(todo, self.read_ahead))
            while pending:
                future = pending.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(self.dataset.members, nxt))
                yield future.result
            # An abandoned iteration (the consumer stopped) leaves at most read_ahead reads to finish.


class SceneLoader:
    """Deterministic, rank-aware, resumable iteration over a SceneDataset (see the module docstring)."""

    def __init__(
        self,
        dataset: SceneDataset,
        batch_size: int,
        *,
        resolution: int | None = None,
        fields: Sequence[str] = ALL_FIELDS,
        views: int | None = None,
        random_views: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        drop_last: bool = False,
        equal_rank_lengths: bool = True,
        max_corrupt_fraction: float = 0.01,
        read_ahead: int = 0,
    ):
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        env_rank, env_world = distributed_rank()
        self.dataset = dataset
        self.batch_size = batch_size
        self.resolution = resolution
        self.fields = tuple(fields)
        self.views = views
        self.random_views = random_views
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = env_rank if rank is None else rank
        self.world_size = env_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise UserError(f"rank {self.rank} is outside world size {self.world_size}")
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.drop_last = drop_last
        self.equal_rank_lengths = equal_rank_lengths
        self.max_corrupt_fraction = max_corrupt_fraction
        if read_ahead < 0:
            raise UserError(f"read_ahead must be >= 0, got {read_ahead}")
        self.read_ahead = read_ahead
        self.epoch = 0
        self.consumed = 0
        self.corrupt_count = 0  # this epoch
        self.corrupt_total = 0
        self.samples_total = 0
        self.unlabelled_total = 0  # samples without voxel labels (version-1 shards, unlabelled imports)
        self.unlit_total = 0  # samples without stored shading lights
        self.no_layout_total = 0  # samples without walls/floor polygon (real scans)
        self.no_materials_total = 0  # samples without PBR materials (real scans: colours only)
        self.corrupt_names: list[str] = []

    # -- order
    def epoch_positions(self, epoch: int | None = None) -> list[int]:
        """This rank's sample sequence for an epoch (indices into the dataset)."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.dataset)
        if self.shuffle:
            order = np.random.default_rng(np.random.SeedSequence([self.seed, int(epoch)])).permutation(n)
        else:
            order = np.arange(n)
        if self.equal_rank_lengths and self.world_size > 1:
            order = order[: (n // self.world_size) * self.world_size]
        return order[self.rank::self.world_size].tolist()

    def __len__(self) -> int:
        """Batches in a full epoch for this rank."""
        n = len(self.epoch_positions())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning, unless it is the epoch a loaded state is part-way through."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.consumed = 0
            self.corrupt_count = 0

    # -- state
    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "num_samples": len(self.dataset), "rank": self.rank, "world_size": self.world_size,
                "corrupt_count": self.corrupt_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise UserError(f"data loader state has format {state.get('format')!r}, expected {STATE_FORMAT}")
        if int(state["num_samples"]) != len(self.dataset):
            raise UserError(
                f"{self.dataset.uri}: the saved data position is for a split of {state['num_samples']} samples, "
                f"but '{self.dataset.split}' has {len(self.dataset)}; resume with the same dataset"
            )
        if int(state.get("world_size", self.world_size)) != self.world_size or int(state["seed"]) != self.seed:
            log.warning("data loader state was saved with seed %s / world size %s; now %s / %s: the sample order "
                        "differs, resuming at the same count", state["seed"], state.get("world_size"), self.seed,
                        self.world_size)
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])
        self.corrupt_count = int(state.get("corrupt_count", 0))

    def metrics(self) -> dict[str, float]:
        """Counters for the tracker (cumulative over this loader's life)."""
        seen = self.samples_total + self.corrupt_total
        return {"data/corrupt_samples": float(self.corrupt_total), "data/samples_read": float(self.samples_total),
                "data/corrupt_fraction": self.corrupt_total / seen if seen else 0.0,
                "data/samples_without_labels": float(self.unlabelled_total),
                "data/samples_without_lights": float(self.unlit_total),
                "data/samples_without_layout": float(self.no_layout_total),
                "data/samples_without_materials": float(self.no_materials_total)}

    # -- iteration
    def _stream(self, positions: list[int], start: int) -> _BatchStream:
        view_seed = (self.seed, self.epoch, 11) if self.random_views else None
        return _BatchStream(self.dataset, positions, start, self.batch_size, self.drop_last, self.resolution,
                            self.fields, self.views, view_seed, self.read_ahead)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        positions = self.epoch_positions()
        epoch_len = len(positions)
        start = self.consumed
        if start >= epoch_len:
            return
        stream = self._stream(positions[start:], start)
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs = {"prefetch_factor": self.prefetch_factor, "persistent_workers": False}
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            **kwargs)
        limit = self.max_corrupt_fraction * epoch_len
        for batch in loader:
            cursor = batch.pop("_cursor")
            self.consumed = int(cursor["end"])
            self.samples_total += int(cursor["count"])
            self.unlabelled_total += int(cursor["unlabelled"])
            self.unlit_total += int(cursor.get("unlit", 0))
            self.no_layout_total += int(cursor.get("no_layout", 0))
            self.no_materials_total += int(cursor.get("no_materials", 0))
            for name in cursor["corrupt"]:
                self.corrupt_count += 1
                self.corrupt_total += 1
                if len(self.corrupt_names) < 100:
                    self.corrupt_names.append(name)
                log.warning("corrupt sample skipped (%d so far this epoch): %s", self.corrupt_count, name)
            if self.corrupt_count > limit:
                raise UserError(
                    f"{self.dataset.uri}: {self.corrupt_count} of {epoch_len} samples in split "
                    f"'{self.dataset.split}' are corrupt, more than max_corrupt_fraction "
                    f"{self.max_corrupt_fraction:g}; first: {self.corrupt_names[0]}. Regenerate the data "
                    "(rerun the data stage with --force) or raise max_corrupt_fraction"
                )
            if cursor["count"]:
                yield batch

    def infinite(self) -> Iterator[dict[str, Any]]:
        """Batches forever, moving to the next epoch when one ends (for step-based training loops)."""
        if not self.epoch_positions():
            raise UserError(f"{self.dataset.uri}: split '{self.dataset.split}' has no samples for rank {self.rank}")
        while True:
            yielded = False
            for batch in self:
                yielded = True
                yield batch
            if not yielded and self.consumed < len(self.epoch_positions()):
                return
            self.set_epoch(self.epoch + 1)


def make_loader(uri: str, split: str, batch_size: int, *, loader_config: Any | None = None, **kwargs: Any
                ) -> SceneLoader:
    """Convenience for stages: a loader from a data-stage output URI and a core `DataLoaderConfig`
    (num_workers, pin_memory, max_corrupt_fraction, read_ahead)."""
    if loader_config is not None:
        kwargs.setdefault("num_workers", loader_config.num_workers)
        kwargs.setdefault("read_ahead", loader_config.read_ahead)
        kwargs.setdefault("pin_memory", loader_config.pin_memory)
        kwargs.setdefault("max_corrupt_fraction", loader_config.max_corrupt_fraction)
    return SceneLoader(open_dataset(uri, split), batch_size, **kwargs)
