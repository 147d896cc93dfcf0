"""The VAE's latents: the encode job that writes them (sharded across ranks) and the one API the downstream stages
read them through (docs/latents.md).

    ds = open_latents(ctx.inputs["latents"], split="train", resolution=64)   # or a VAE output URI
    sample = ds[0]                          # key, coords [M, 3], feats [M, 2L] (normalised), frame, tokens, ...
    for indices in ds.batches(max_tokens=65536, shuffle=True, epoch=e):
        batch = ds.collate(indices)         # coords [ΣM, 4] (b, x, y, z), feats [ΣM, 2L]
    raw = ds.denormalize(generated, "geometry")          # a generator's output back to the VAE's latent space
    out = decode_geometry(vae, {**batch, "feats": raw, "normalized": False})

On disk, under the VAE stage's output (index.json is written last, by rank 0: it is the commit point):

    latents/index.json                                  layout, per-resolution statistics, shard list, data join
    latents/<N>/<split>/shard-r<rank>-<n>.safetensors   standard safetensors; sample p's tensors `p.coords` (int32
                                                        [M, 3]) and `p.feats` (float32 [M, 2L]) are adjacent
    latents/<N>/<split>/shard-r<rank>-<n>.json          per sample: key, data index, byte range, sha256, tokens, frame
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from interiorfusion_core.engine.distributed import Runtime, barrier, gather_objects
from interiorfusion_core.errors import UserError
from interiorfusion_core.manifest import Manifest, read_manifest, try_read_manifest
from interiorfusion_core.sparse import SparseTensor
from interiorfusion_core.stage import RecordingStore, StageInput
from interiorfusion_core.storage import ArtifactStore, ObjectInfo, open_store
from interiorfusion_data.format import SampleError, decode_sample
from interiorfusion_data.frame import VoxelFrame
from interiorfusion_data.loader import SceneDataset, collate_scenes, open_dataset
from interiorfusion_vae.config import VAEPretrainConfig
from interiorfusion_vae.task import sparse_batch

if TYPE_CHECKING:
    from interiorfusion_vae.model import DecoderOutput, GeometryOutput, SLATInteriorVAE

log = logging.getLogger("interiorfusion_vae")

LATENT_FORMAT = "interiorfusion.latents/2"
PREFIX = "latents"
INDEX_KEY = f"{PREFIX}/index.json"
# Normalisation divides by the std; a dead channel (the KL drove it to a constant) would blow up without a floor.
STD_FLOOR = 1e-6
STATS_SPLIT = "train"
_COORD_BYTES = 3 * 4  # int32 x, y, z per token


def _format_error(where: str, found: Any) -> UserError:
    return UserError(
        f"{where}: latent format {found!r} is not one this reader knows ({LATENT_FORMAT}); rerun the VAE stage "
        "with --force to rewrite its latents with this code"
    )


# ---------------------------------------------------------------------------------------------- statistics
@dataclass
class Moments:
    """Per-channel count, mean and sum of squared deviations in float64, merged with Chan et al.'s parallel update:
    every rank accumulates its own samples and rank 0 merges the ranks (no second pass over the latents)."""

    n: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None

    def add(self, x: np.ndarray) -> None:
        if len(x) == 0:
            return
        x = np.asarray(x, np.float64)
        self.merge(Moments(len(x), x.mean(0), ((x - x.mean(0)) ** 2).sum(0)))

    def merge(self, other: Moments) -> None:
        if other.n == 0:
            return
        if self.n == 0 or self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = other.n, np.array(other.mean), np.array(other.m2)
            return
        n = self.n + other.n
        delta = np.asarray(other.mean) - self.mean
        self.mean = self.mean + delta * (other.n / n)
        self.m2 = self.m2 + np.asarray(other.m2) + delta**2 * (self.n * other.n / n)
        self.n = n

    def stats(self, channels: int) -> tuple[list[float], list[float]]:
        """(mean, std) per channel; mean 0 / std 1 without any token (normalising then leaves latents alone)."""
        if self.n == 0 or self.mean is None or self.m2 is None:
            return [0.0] * channels, [1.0] * channels
        std = np.maximum(np.sqrt(self.m2 / self.n), STD_FLOOR)
        return [float(v) for v in self.mean], [float(v) for v in std]


@dataclass(frozen=True)
class LatentStats:
    """Per-channel mean and std of one resolution's latents over the train split (geometry channels, then
    material). `normalize` maps latents to zero mean / unit variance per channel; `denormalize` undoes it."""

    mean: torch.Tensor  # [2L] float64
    std: torch.Tensor  # [2L] float64
    latent_dim: int

    def channels(self, which: str) -> slice:
        L = self.latent_dim
        spans = {"all": slice(0, 2 * L), "geometry": slice(0, L), "material": slice(L, 2 * L)}
        if which not in spans:
            raise ValueError(f"channels must be one of {', '.join(spans)}, got {which!r}")
        return spans[which]

    def _params(self, x: torch.Tensor, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.channels(which)
        width = span.stop - span.start
        if x.shape[-1] != width:
            raise ValueError(f"{which} latents have {width} channels, got a tensor of {x.shape[-1]}; pass "
                             f"channels='geometry' or 'material' for one half of the {2 * self.latent_dim}")
        return self.mean[span].to(x.device), self.std[span].to(x.device)

    def normalize(self, x: torch.Tensor, channels: str = "all") -> torch.Tensor:
        mean, std = self._params(x, channels)
        return ((x.double() - mean) / std).to(x.dtype)  # float64 inside: one rounding, to x's dtype

    def denormalize(self, x: torch.Tensor, channels: str = "all") -> torch.Tensor:
        mean, std = self._params(x, channels)
        return (x.double() * std + mean).to(x.dtype)


# ---------------------------------------------------------------------------------------------- writer
@dataclass
class _Pending:
    index: int
    key: str
    rel: int  # offset of the sample's block in the shard's data buffer
    tokens: int
    sha256: str
    frame: dict[str, Any]


class LatentShardWriter:
    """One rank's latents of one (resolution, split), in shards of `samples_per_shard` samples. Each shard is a
    standard safetensors file whose tensors are laid out sample by sample (`p.coords` then `p.feats`), so one
    ranged read fetches one sample; its JSON index gives every sample's key, data index, byte range, sha256, token
    count and metric frame. Sample blocks are spooled to a local file, so a shard never has to fit in memory."""

    def __init__(self, store: ArtifactStore, resolution: int, split: str, samples_per_shard: int, work_dir: Path,
                 rank: int = 0, channels: int | None = None):
        self.store, self.resolution, self.split, self.limit = store, resolution, split, samples_per_shard
        self.rank, self.channels = rank, channels
        self.dir = f"{PREFIX}/{resolution}/{split}"
        self.spool = Path(work_dir) / f"latents-{resolution}-{split}-r{rank}.data"
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        self.infos: list[ObjectInfo] = []  # every object written: reported to rank 0 for the manifest
        self.shards: list[dict[str, Any]] = []  # entries of index.json
        self.samples = 0
        self.tokens = 0
        self._pending: list[_Pending] = []
        self._size = 0
        self._file: Any = None

    def add(self, index: int, key: str, coords: torch.Tensor, feats: torch.Tensor, frame: Mapping[str, Any]) -> None:
        """Sample `index` of the data split (its key joins it to the data shards): latent-grid `coords` [M, 3] and
        raw (unnormalised) `feats` [M, 2L], in the encoder's row order (the decoder's input order)."""
        m = len(coords)
        if coords.shape != (m, 3) or feats.shape[0] != m:
            raise ValueError(f"{key}: coords {tuple(coords.shape)} and feats {tuple(feats.shape)} do not line up")
        if self.channels is None:
            self.channels = int(feats.shape[1])
        elif feats.shape[1] != self.channels:
            raise ValueError(f"{key}: {feats.shape[1]} channels, the shard has {self.channels}")
        block = (coords.detach().cpu().numpy().astype("<i4").tobytes()
                 + feats.detach().cpu().float().numpy().astype("<f4").tobytes())
        if self._file is None:
            self._file = open(self.spool, "wb")  # noqa: SIM115 - kept open across add() calls until flush()
        self._file.write(block)
        self._pending.append(_Pending(index, key, self._size, m, hashlib.sha256(block).hexdigest(), dict(frame)))
        self._size += len(block)
        self.samples += 1
        self.tokens += m
        if len(self._pending) >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        self._file.close()
        self._file = None
        c = int(self.channels or 0)
        header: dict[str, Any] = {"__metadata__": {"format": LATENT_FORMAT, "resolution": str(self.resolution),
                                                   "split": self.split}}
        for p, s in enumerate(self._pending):
            mid = s.rel + s.tokens * _COORD_BYTES
            header[f"{p:06d}.coords"] = {"dtype": "I32", "shape": [s.tokens, 3], "data_offsets": [s.rel, mid]}
            header[f"{p:06d}.feats"] = {"dtype": "F32", "shape": [s.tokens, c],
                                        "data_offsets": [mid, mid + s.tokens * c * 4]}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads its header to 8 bytes
        base = 8 + len(raw)
        name = f"{self.dir}/shard-r{self.rank:05d}-{len(self.shards):05d}"
        path = self.spool.with_suffix(".safetensors")
        with open(path, "wb") as out, open(self.spool, "rb") as data:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            while block := data.read(1 << 24):
                out.write(block)
        shard = self.store.put_file(f"{name}.safetensors", path)
        path.unlink(missing_ok=True)
        self.spool.unlink(missing_ok=True)
        samples = [{"position": p, "index": s.index, "key": s.key, "offset": base + s.rel,
                    "size": s.tokens * (_COORD_BYTES + 4 * c), "sha256": s.sha256, "tokens": s.tokens, **s.frame}
                   for p, s in enumerate(self._pending)]
        # Compact JSON: readers load every shard index of a split at open, ~300 bytes per sample this way.
        index = self.store.put_bytes(f"{name}.json", json.dumps({
            "format": LATENT_FORMAT, "resolution": self.resolution, "split": self.split,
            "shard": f"{name}.safetensors", "channels": c, "samples": samples,
        }, sort_keys=True, separators=(",", ":")).encode() + b"\n")
        self.infos += [shard, index]
        self.shards.append({"shard": shard.key, "shard_sha256": shard.sha256, "shard_size": shard.size,
                            "index": index.key, "index_sha256": index.sha256, "samples": len(samples),
                            "tokens": sum(s.tokens for s in self._pending)})
        self._pending, self._size = [], 0


# ---------------------------------------------------------------------------------------------- encode job
@dataclass
class EncodeResult:
    index: str  # key of index.json under the output
    metrics: dict[str, float] = field(default_factory=dict)  # totals over every rank


def encode_resolutions(config: VAEPretrainConfig) -> list[int]:
    """encode.resolutions (the config fills in its default: the curriculum's resolutions and the target)."""
    return list(config.encode.resolutions or [config.model.target_resolution])


def check_data_resolutions(data_uri: str, config: VAEPretrainConfig) -> None:
    """Refuse, before training, an encode resolution the data cannot provide (stored, or downsampled from a finer
    stored level it divides), rather than after days of training."""
    dataset = open_dataset(data_uri, "train").info
    stored = sorted(int(r) for r in dataset.get("resolutions", []))
    if not stored:
        return
    for res in encode_resolutions(config):
        if res not in stored and not any(r > res and r % res == 0 for r in stored):
            raise UserError(
                f"encode.resolutions: the data at {data_uri} holds voxels at {', '.join(map(str, stored))}, so "
                f"latents at {res} cannot be encoded; encode at those or below them"
            )


def _frame_of(meta: Mapping[str, Any], resolution: int) -> dict[str, Any]:
    frame = VoxelFrame.from_meta(meta)
    return {"origin": [float(v) for v in frame.origin], "cube_size": float(frame.cube_size),
            "voxel_size": frame.voxel_size(resolution), "floor_z": frame.floor_z, "frame_kind": frame.kind}


def _data_ref(data_uri: str) -> dict[str, Any]:
    """Which data the latents join to: its manifest digest, not its URI (the URI is in the VAE manifest's inputs;
    a URI here would change this file's sha256, and so the VAE output's digest, when the same data moves)."""
    manifest = try_read_manifest(open_store(data_uri))
    return {"stage": "data", "digest": manifest.digest if manifest is not None else None}


def _clear(output: ArtifactStore) -> None:
    """Remove what an interrupted attempt left under latents/ (index first: never a stale complete-looking index)."""
    if output.exists(INDEX_KEY):
        output.delete(INDEX_KEY)
    output.delete_prefix(PREFIX)


@torch.no_grad()
def encode_dataset(output: ArtifactStore, model: SLATInteriorVAE, data_uri: str, config: VAEPretrainConfig, *,
                   work_dir: Path, rt: Runtime | None = None, device: torch.device | str | None = None
                   ) -> EncodeResult:
    """Geometry and material latents (μ) of every sample of every `encode.splits` split at every
    `encode.resolutions` resolution. A collective under a launcher: rank r encodes samples r, r + W, ... of each
    split on `device` (default: the model's) and writes its own shards; after they all finish, rank 0 merges the
    statistics, adds every rank's files to the manifest record and writes index.json (the commit point).
    Train-split samples always feed the normalisation statistics, also when the train split's latents are not
    kept."""
    rank, world = (rt.rank, rt.world_size) if rt is not None else (0, 1)
    resolutions = encode_resolutions(config)
    keep = list(dict.fromkeys(config.encode.splits))
    splits = keep if STATS_SPLIT in keep else [STATS_SPLIT, *keep]
    channels = 2 * config.model.latent_dim
    if rank == 0:
        _clear(output)
    if rt is not None:
        barrier(rt)  # nobody writes before the leftovers are gone
    model.eval()
    writers = {(r, s): LatentShardWriter(output, r, s, config.encode.samples_per_shard, work_dir, rank, channels)
               for r in resolutions for s in keep}
    moments = {r: Moments() for r in resolutions}
    sizes: dict[str, int] = {}
    skipped: list[dict[str, Any]] = []
    encoded = 0
    started = time.perf_counter()
    for split in splits:
        dataset = open_dataset(data_uri, split)
        sizes[split] = len(dataset)
        mine = range(rank, len(dataset), world)
        split_started = time.perf_counter()
        for n, i in enumerate(mine):
            try:
                samples = _read_voxels(dataset, i, resolutions)
            except SampleError as exc:
                log.warning("encode: skipping %s", exc)
                skipped.append({"split": split, "index": i, "reason": str(exc)})
                continue
            for res, sample in zip(resolutions, samples, strict=True):
                mu = encode_sample(model, sample, device)
                coords, feats = mu.coords[:, 1:].to(torch.int32).cpu(), mu.feats.float().cpu()
                if split == STATS_SPLIT:
                    moments[res].add(feats.double().numpy())
                if split in keep:
                    writers[(res, split)].add(i, sample["key"], coords, feats, _frame_of(sample["meta"], res))
            encoded += 1
            _progress(rank, split, n + 1, len(mine), split_started)
    for w in writers.values():
        w.flush()
    seconds = time.perf_counter() - started
    report = {
        "rank": rank, "seconds": seconds, "encoded": encoded, "skipped": skipped,
        "infos": [i for w in writers.values() for i in w.infos],
        "shards": {f"{r}/{s}": w.shards for (r, s), w in writers.items()},
        "moments": {r: (m.n, None if m.mean is None else m.mean.tolist(), None if m.m2 is None else m.m2.tolist())
                    for r, m in moments.items()},
    }
    everyone = gather_objects(report, rt) if rt is not None else [report]
    # Every rank got every report (an all-gather): each decides the same, so a refusal fails on all ranks at once.
    all_skipped = sorted((s for r in everyone for s in r["skipped"]), key=lambda s: (s["split"], s["index"]))
    _check_skipped(all_skipped, sizes, config.data.max_corrupt_fraction)
    metrics = {"encode_seconds": max(r["seconds"] for r in everyone),
               "encode_samples": float(sum(r["encoded"] for r in everyone)),
               "encode_skipped": float(len(all_skipped))}
    # Per sample and rank: a sample's read plus its encodes at every resolution.
    metrics["encode_seconds_per_sample"] = sum(r["seconds"] for r in everyone) / max(metrics["encode_samples"], 1.0)
    if rank == 0:
        index = _index(everyone, resolutions, keep, sizes, all_skipped, config, data_uri, world)
        for r in index["resolutions"].values():
            metrics[f"latent_tokens_{r['resolution']}"] = float(sum(s["tokens"] for s in r["splits"].values()))
        if isinstance(output, RecordingStore):
            for r in everyone:
                for info in r["infos"]:
                    output.remember(info)
        output.put_json(INDEX_KEY, index)  # the commit point: written after every rank's shards exist
    if rt is not None:
        barrier(rt)
    return EncodeResult(INDEX_KEY, metrics)


def encode_sample(model: SLATInteriorVAE, sample: Mapping[str, Any], device: torch.device | str | None = None
                  ) -> SparseTensor:
    """μ (geometry | material channels) of one decoded data sample, on `device` (default: the model's) in the
    model's dtype. One sample per call: its latents then do not depend on which rank or batch encoded it."""
    param = next(model.parameters())
    device = param.device if device is None else device
    batch = collate_scenes([dict(sample)])
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    occ, material = sparse_batch(batch, param.dtype)
    return model.encode(occ, material)["mu"]  # type: ignore[return-value]


def _read_voxels(dataset: SceneDataset, i: int, resolutions: Sequence[int]) -> list[dict[str, Any]]:
    """Sample i's voxels at each resolution from one read of its bytes (SampleError names it when corrupt)."""
    ref = dataset.refs[i]
    members = dataset.members(i)
    try:
        return [decode_sample(members, res, ("voxels",)) for res in resolutions]
    except SampleError as exc:
        msg = str(exc)
        raise SampleError(msg if msg.startswith(ref.shard) else f"{ref.name}: {msg}") from None
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise SampleError(f"{ref.name}: undecodable ({type(exc).__name__}: {exc})") from None


def _check_skipped(skipped: list[dict[str, Any]], sizes: Mapping[str, int], limit: float) -> None:
    for split, size in sizes.items():
        bad = [s for s in skipped if s["split"] == split]
        if bad and len(bad) > limit * size:
            raise UserError(
                f"encode: {len(bad)} of {size} {split} samples are corrupt (more than data.max_corrupt_fraction "
                f"{limit:g}), the first {bad[0]['reason']}; repair the data and rerun"
            )


def _progress(rank: int, split: str, done: int, total: int, started: float) -> None:
    step = max(total // 10, 1)
    if rank == 0 and (done == total or done % step == 0):
        rate = (time.perf_counter() - started) / max(done, 1)
        print(f"encode: {split} {done}/{total} samples on rank 0 ({rate:.2f} s/sample)", file=sys.stderr,
              flush=True)


def _index(reports: list[dict[str, Any]], resolutions: list[int], keep: list[str], sizes: Mapping[str, int],
           skipped: list[dict[str, Any]], config: VAEPretrainConfig, data_uri: str, world: int) -> dict[str, Any]:
    L, c = config.model.latent_dim, config.model.compression
    out: dict[str, Any] = {
        "format": LATENT_FORMAT, "latent_dim": L, "compression": c, "dtype": "float32",
        "channels": {"geometry": [0, L], "material": [L, 2 * L]},
        "coords": "int32 x, y, z on the latent grid (resolution / compression per axis)",
        "target_resolution": config.model.target_resolution,
        "data": _data_ref(data_uri), "world_size": world, "skipped": skipped, "resolutions": {},
    }
    for res in resolutions:
        total = Moments()
        for r in reports:  # rank order: the merge is the same on every rerun with the same world size
            n, mean, m2 = r["moments"][res]
            total.merge(Moments(n, None if mean is None else np.asarray(mean), None if m2 is None else np.asarray(m2)))
        mean, std = total.stats(2 * L)
        entry: dict[str, Any] = {
            "resolution": res, "latent_resolution": res // c,
            "normalization": {"split": STATS_SPLIT, "tokens": total.n, "mean": mean, "std": std},
            "splits": {},
        }
        for split in keep:
            shards = [s for r in reports for s in r["shards"][f"{res}/{split}"]]
            entry["splits"][split] = {"samples": sum(s["samples"] for s in shards),
                                      "tokens": sum(s["tokens"] for s in shards),
                                      "data_samples": sizes.get(split, 0), "shards": shards}
        out["resolutions"][str(res)] = entry
    return out


# ---------------------------------------------------------------------------------------------- reader
@dataclass(frozen=True)
class LatentRef:
    shard: str
    position: int
    index: int
    key: str
    offset: int
    size: int
    sha256: str
    tokens: int
    origin: tuple[float, float, float]
    cube_size: float
    floor_z: float | None
    frame_kind: str

    @property
    def name(self) -> str:
        return f"{self.shard}:{self.key}"


class LatentDataset(torch.utils.data.Dataset):
    """One (resolution, split) of a VAE output's latents, in data order (the split's sample order), with random
    access by ranged reads. `normalized` (default): feats come back per-channel standardised with the train
    split's statistics; `denormalize` maps them (or a generator's output) back for decoding."""

    def __init__(self, store: ArtifactStore, index: dict[str, Any], split: str, resolution: int,
                 refs: list[LatentRef], normalized: bool = True, data_uri: str | None = None):
        self.store, self.info, self.split, self.resolution = store, index, split, resolution
        self.refs, self.normalized = refs, normalized
        self.data_uri = data_uri  # the VAE run's data input (from its manifest), where the conditions are
        self.latent_dim = int(index["latent_dim"])
        self.compression = int(index["compression"])
        self.latent_resolution = resolution // self.compression
        norm = index["resolutions"][str(resolution)]["normalization"]
        self.stats = LatentStats(torch.tensor(norm["mean"], dtype=torch.float64),
                                 torch.tensor(norm["std"], dtype=torch.float64), self.latent_dim)
        self._positions = {r.key: i for i, r in enumerate(refs)}

    @classmethod
    def open(cls, source: str | Path | ArtifactStore | StageInput, split: str = "train", resolution: int | None = None,
             *, normalized: bool = True, require_manifest: bool = True) -> LatentDataset:
        return open_latents(source, split, resolution, normalized=normalized, require_manifest=require_manifest)

    # ---- what is here
    def __len__(self) -> int:
        return len(self.refs)

    @property
    def uri(self) -> str:
        return self.store.uri

    @property
    def keys(self) -> list[str]:
        return [r.key for r in self.refs]

    @property
    def resolutions(self) -> list[int]:
        """Every resolution these latents were encoded at (open another with `open_latents(..., resolution=N)`)."""
        return sorted(int(r) for r in self.info["resolutions"])

    @property
    def channels(self) -> int:
        return 2 * self.latent_dim

    def position(self, key: str) -> int:
        """The position of the sample with this data-stage key (KeyError when absent)."""
        return self._positions[key]

    def token_counts(self) -> np.ndarray:
        """Latent tokens (active latent voxels) of every sample, from the index: no shard is read."""
        return np.array([r.tokens for r in self.refs], dtype=np.int64)

    def frame(self, i: int) -> VoxelFrame:
        """Sample i's metric voxel frame (the data stage's): latent voxel (x, y, z) at `latent_resolution` covers
        origin + [x, x+1) × [y, y+1) × [z, z+1) × cube_size / latent_resolution metres."""
        r = self.refs[i]
        return VoxelFrame(np.asarray(r.origin, np.float64), r.cube_size, r.floor_z, r.frame_kind)

    # ---- samples
    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.get(i)

    def read_raw(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(coords [M, 3] int32, raw feats [M, 2L] float32) of sample i: one ranged read, verified."""
        ref = self.refs[i]
        data = self.store.get_range(ref.shard, ref.offset, ref.offset + ref.size)
        if len(data) != ref.size:
            raise SampleError(f"{ref.name}: truncated ({len(data)} of {ref.size} bytes)")
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise SampleError(f"{ref.name}: sha256 mismatch (the latent shard is corrupt)")
        m, c = ref.tokens, self.channels
        coords = np.frombuffer(data, "<i4", count=3 * m).reshape(m, 3).astype(np.int32)
        feats = np.frombuffer(data, "<f4", count=m * c, offset=m * _COORD_BYTES).reshape(m, c).astype(np.float32)
        return torch.from_numpy(coords), torch.from_numpy(feats)

    def get(self, i: int) -> dict[str, Any]:
        """Sample i: `key` (the data stage's: joins it to its conditions), `index` (its position in the data
        split), `coords` [M, 3] int32 latent-grid xyz, `feats` [M, 2L] float32 (normalised unless opened with
        normalized=False) with `geometry` / `material` views of its halves, `tokens`, `resolution` (the voxel grid
        N), `latent_resolution` (N / compression), `origin` [3] float64 metres, `voxel_size` (at N),
        `latent_voxel_size`, `cube_size`, `floor_z`, `frame` (a VoxelFrame) and `normalized`."""
        ref = self.refs[i]
        coords, feats = self.read_raw(i)
        if self.normalized:
            feats = self.stats.normalize(feats)
        frame = self.frame(i)
        return self._with_views({
            "key": ref.key, "index": ref.index, "split": self.split, "coords": coords, "feats": feats,
            "tokens": ref.tokens, "resolution": self.resolution, "latent_resolution": self.latent_resolution,
            "compression": self.compression, "origin": torch.tensor(ref.origin, dtype=torch.float64),
            "cube_size": ref.cube_size, "voxel_size": frame.voxel_size(self.resolution),
            "latent_voxel_size": frame.voxel_size(self.latent_resolution), "floor_z": ref.floor_z, "frame": frame,
            "normalized": self.normalized,
        })

    def _with_views(self, sample: dict[str, Any]) -> dict[str, Any]:
        L = self.latent_dim
        if sample["feats"].shape[1] == 2 * L:
            sample["geometry"], sample["material"] = sample["feats"][:, :L], sample["feats"][:, L:]
        else:  # one half only (a generator's output): no views that would mislabel it
            sample.pop("geometry", None)
            sample.pop("material", None)
        return sample

    def collate(self, indices: Sequence[int]) -> dict[str, Any]:
        return collate_latents([self.get(i) for i in indices])

    # ---- normalisation
    def normalize(self, latents: Any, channels: str = "all") -> Any:
        """Raw latents → normalised: a tensor ([M, 2L], or [M, L] with channels 'geometry'/'material') or a sample /
        batch dict (a new dict; a normalised one is returned as it is)."""
        return self._map(latents, channels, to_normalized=True)

    def denormalize(self, latents: Any, channels: str = "all") -> Any:
        """Normalised latents (what this dataset yields, or a generator trained on it produced) → the VAE's latent
        space, for `decode` / `decode_geometry`. Same argument forms as `normalize`."""
        return self._map(latents, channels, to_normalized=False)

    def _map(self, latents: Any, channels: str, to_normalized: bool) -> Any:
        fn = self.stats.normalize if to_normalized else self.stats.denormalize
        if isinstance(latents, torch.Tensor):
            return fn(latents, channels)
        if not isinstance(latents, Mapping) or "feats" not in latents:
            raise TypeError(f"expected a latent tensor or a sample/batch dict with 'feats', got {type(latents)}")
        if bool(latents.get("normalized", True)) == to_normalized:
            return latents
        return self._with_views({**latents, "feats": fn(latents["feats"], channels), "normalized": to_normalized})

    # ---- batching
    def batch_sampler(self, max_tokens: int, *, shuffle: bool = False, seed: int = 0, rank: int = 0,
                      world_size: int = 1, max_samples: int | None = None) -> TokenBudgetBatchSampler:
        """A torch batch_sampler of token-budget batches: DataLoader(ds, batch_sampler=..., collate_fn=
        collate_latents)."""
        return TokenBudgetBatchSampler(self.token_counts(), max_tokens, shuffle=shuffle, seed=seed, rank=rank,
                                       world_size=world_size, max_samples=max_samples, names=self.keys)

    def batches(self, max_tokens: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0, rank: int = 0,
                world_size: int = 1, max_samples: int | None = None) -> list[list[int]]:
        """This epoch's batches of sample positions, each holding at most `max_tokens` latent tokens."""
        sampler = self.batch_sampler(max_tokens, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                                     max_samples=max_samples)
        sampler.set_epoch(epoch)
        return list(sampler)

    # ---- the join to the data stage
    def open_data(self, uri: str | None = None, check_digest: bool = True) -> SceneDataset:
        """The data split these latents were encoded from (the conditions: views, layout, ...), where sample
        `index` has the latent sample's key. `uri` defaults to the VAE run's data input; data whose manifest digest
        is not the one the latents were encoded from is refused."""
        uri = uri or self.data_uri
        if uri is None:
            raise UserError(f"{self.uri}: these latents have no manifest naming their data; pass the data's URI")
        data = open_dataset(uri, self.split)
        want = self.info["data"].get("digest")
        if check_digest and want is not None:
            have = read_manifest(data.store).digest
            if have != want:
                raise UserError(f"{uri}: is not the data these latents were encoded from (manifest digest "
                                f"{have[:12]}, the latents' {want[:12]}); rerun the VAE stage on it")
        return data


class TokenBudgetBatchSampler:
    """Batches of sample positions whose token counts add up to at most `max_tokens` (a sparse batch concatenates
    its samples' tokens, so this bounds a step's activations) and to at most `max_samples` samples, filled
    greedily in a seeded order per epoch (`set_epoch`). Under DDP rank r takes batches r, r + W, ... and every rank
    yields the same number (the last < W batches of an epoch are dropped), so no rank waits on a missing step."""

    def __init__(self, token_counts: Sequence[int] | np.ndarray, max_tokens: int, *, shuffle: bool = False,
                 seed: int = 0, rank: int = 0, world_size: int = 1, max_samples: int | None = None,
                 names: Sequence[str] | None = None):
        self.tokens = np.asarray(token_counts, dtype=np.int64)
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not within world_size {world_size}")
        too_big = np.flatnonzero(self.tokens > max_tokens)
        if len(too_big):
            i = int(too_big[0])
            name = names[i] if names is not None else f"sample {i}"
            raise UserError(f"{name} has {int(self.tokens[i])} latent tokens, more than max_tokens {max_tokens} "
                            f"({len(too_big)} sample(s) do not fit); raise max_tokens to at least "
                            f"{int(self.tokens.max())}")
        self.max_tokens, self.max_samples = int(max_tokens), max_samples
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _all(self) -> list[list[int]]:
        order = np.arange(len(self.tokens))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.tokens))
        batches: list[list[int]] = []
        current: list[int] = []
        total = 0
        for i in order.tolist():
            t = int(self.tokens[i])
            full = self.max_samples is not None and len(current) >= self.max_samples
            if current and (total + t > self.max_tokens or full):
                batches.append(current)
                current, total = [], 0
            current.append(i)
            total += t
        if current:
            batches.append(current)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._all()
        per_rank = len(batches) // self.world_size if self.world_size > 1 else len(batches)
        return iter(batches[self.rank::self.world_size][:per_rank])

    def __len__(self) -> int:
        n = len(self._all())
        return n // self.world_size if self.world_size > 1 else n


def open_latents(source: str | Path | ArtifactStore | StageInput, split: str = "train", resolution: int | None = None,
                 *, normalized: bool = True, require_manifest: bool = True) -> LatentDataset:
    """One split at one resolution (default: the VAE's target resolution) of a VAE stage output: its URI (or path),
    store, or the StageInput a downstream stage got. Every file read is verified against the sha256 the manifest (or the
    index) recorded; `require_manifest=False` also opens latents written outside a stage run."""
    manifest: Manifest | None
    if isinstance(source, StageInput):
        store, manifest = source.store, source.manifest
    else:
        store = source if isinstance(source, ArtifactStore) else open_store(source)
        manifest = read_manifest(store) if require_manifest else try_read_manifest(store)
    artifacts: dict[str, str] = {}
    key = INDEX_KEY
    if manifest is not None:
        if manifest.stage != "vae":
            raise UserError(f"{store.uri}: is an output of stage '{manifest.stage}', not of the VAE stage")
        artifacts = {k: v.sha256 for k, v in manifest.artifacts.items()}
        key = manifest.outputs.get("latents", INDEX_KEY)
        if key not in artifacts:
            raise UserError(f"{store.uri}: this VAE run wrote no latents (encode.enabled was false); rerun it with "
                            "encode.enabled: true")
    elif not store.exists(key):
        raise UserError(f"{store.uri_for(key)}: no latent index here (the encode job did not finish)")
    where = store.uri_for(key)
    try:
        index = json.loads(store.get_bytes(key, artifacts.get(key)))
    except json.JSONDecodeError:
        raise UserError(f"{where}: not a JSON latent index") from None
    if not isinstance(index, dict) or index.get("format") != LATENT_FORMAT:
        raise _format_error(where, index.get("format") if isinstance(index, dict) else None)
    held = sorted(int(r) for r in index["resolutions"])
    if resolution is None:
        target = int(index.get("target_resolution", held[-1]))
        resolution = target if target in held else held[-1]
    if resolution not in held:
        raise UserError(f"{where}: no latents at resolution {resolution} (encoded: {', '.join(map(str, held))})")
    splits = index["resolutions"][str(resolution)]["splits"]
    if split not in splits:
        raise UserError(f"{where}: no split '{split}' at resolution {resolution} (splits: {', '.join(splits)})")
    shards = splits[split]["shards"]

    def load(entry: dict[str, Any]) -> dict[str, Any]:
        sha = artifacts.get(entry["index"], entry.get("index_sha256"))
        shard_index = store.get_json(entry["index"], sha)
        if not isinstance(shard_index, dict) or shard_index.get("format") != LATENT_FORMAT:
            raise _format_error(store.uri_for(entry["index"]),
                                shard_index.get("format") if isinstance(shard_index, dict) else None)
        return shard_index

    with ThreadPoolExecutor(8) as pool:
        shard_indexes = list(pool.map(load, shards))
    refs = [LatentRef(idx["shard"], int(s["position"]), int(s["index"]), str(s["key"]), int(s["offset"]),
                      int(s["size"]), str(s["sha256"]), int(s["tokens"]), tuple(float(v) for v in s["origin"]),
                      float(s["cube_size"]), None if s.get("floor_z") is None else float(s["floor_z"]),
                      str(s.get("frame_kind", "metric")))
            for idx in shard_indexes for s in idx["samples"]]
    refs.sort(key=lambda r: r.index)  # data order, whatever the number of ranks that wrote the shards
    data = manifest.inputs.get("data") if manifest is not None else None
    return LatentDataset(store, index, split, resolution, refs, normalized, data.uri if data is not None else None)


# ---------------------------------------------------------------------------------------------- batches, decoding
def collate_latents(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Samples of one resolution as a sparse batch: `coords` [ΣM, 4] int32 (b, x, y, z), `feats` [ΣM, C] (with
    `geometry` / `material` views when C = 2L), `num_tokens` (B,), `origin` (B, 3) float64, `voxel_size` /
    `latent_voxel_size` (B,) float64, plus `keys`, `indices`, `resolution`, `latent_resolution`, `compression`,
    `normalized`."""
    if not samples:
        raise ValueError("collate_latents: no samples")
    first = samples[0]
    for s in samples[1:]:
        if s["resolution"] != first["resolution"] or bool(s["normalized"]) != bool(first["normalized"]):
            raise ValueError("collate_latents: samples differ in resolution or normalisation; batch them apart")
    coords = torch.cat([torch.cat([torch.full((len(s["coords"]), 1), b, dtype=torch.int32), s["coords"].int()], 1)
                        for b, s in enumerate(samples)])
    feats = torch.cat([s["feats"] for s in samples])
    out: dict[str, Any] = {
        "keys": [s["key"] for s in samples], "indices": [int(s["index"]) for s in samples],
        "coords": coords, "feats": feats,
        "num_tokens": torch.tensor([len(s["coords"]) for s in samples], dtype=torch.int64),
        "origin": torch.stack([torch.as_tensor(s["origin"], dtype=torch.float64) for s in samples]),
        "voxel_size": torch.tensor([float(s["voxel_size"]) for s in samples], dtype=torch.float64),
        "latent_voxel_size": torch.tensor([float(s["latent_voxel_size"]) for s in samples], dtype=torch.float64),
        "resolution": int(first["resolution"]), "latent_resolution": int(first["latent_resolution"]),
        "compression": int(first["compression"]), "normalized": bool(first["normalized"]),
    }
    if "geometry" in first:
        width = first["geometry"].shape[1]
        out["geometry"], out["material"] = feats[:, :width], feats[:, width:]
    return out


def latent_sparse(latents: Mapping[str, Any] | SparseTensor, channels: slice | None = None,
                  device: torch.device | str | None = None) -> SparseTensor:
    """A SparseTensor on the latent grid (spatial shape N / compression, stride compression: exactly what the
    encoder's μ is) from a sample or collated batch; `channels` picks part of the feats."""
    if isinstance(latents, SparseTensor):
        z = latents
        if channels is not None:
            z = z.replace(z.feats[:, channels])
        return z if device is None else SparseTensor(z.coords.to(device), z.feats.to(device), z.spatial_shape,
                                                     z.stride, z.batch_size)
    if latents.get("normalized", False):
        raise ValueError("these latents are normalised; decode needs the VAE's own latent space: pass "
                         "dataset.denormalize(latents) (or open the dataset with normalized=False)")
    coords, feats = latents["coords"], latents["feats"]
    if coords.shape[1] == 3:  # one sample
        coords = torch.cat([torch.zeros(len(coords), 1, dtype=coords.dtype), coords], 1)
        batch_size = 1
    else:
        batch_size = len(latents["num_tokens"]) if "num_tokens" in latents else None
    if channels is not None:
        feats = feats[:, channels]
    if device is not None:
        coords, feats = coords.to(device), feats.to(device)
    return SparseTensor(coords, feats, int(latents["latent_resolution"]), int(latents["compression"]),
                        batch_size=batch_size)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def decode(model: SLATInteriorVAE, latents: Mapping[str, Any] | SparseTensor,
           structure: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> DecoderOutput:
    """Decode denormalised latents (geometry | material channels: a LatentDataset sample or collated batch after
    `denormalize`, or a SparseTensor) with the VAE, on the model's device. `structure` teacher-forces the
    subdivision (see SLATInteriorVAE.decode); None prunes by the model's own logits."""
    L = int(model.latent_dim)
    z = latent_sparse(latents, device=_model_device(model))
    if z.feats.shape[1] != 2 * L:
        raise ValueError(f"decode needs {2 * L} latent channels (geometry | material), got {z.feats.shape[1]}; "
                         "use decode_geometry for geometry channels alone")
    return model.decode(z, structure)


def decode_geometry(model: SLATInteriorVAE, geometry_latents: Mapping[str, Any] | SparseTensor,
                    structure: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> GeometryOutput:
    """Decode geometry latents alone (what the structure DiT generates: L channels; a full 2L sample or batch is
    cut to its geometry half) with `SLATInteriorVAE.decode_geometry`."""
    L = int(model.latent_dim)
    width = (geometry_latents.feats if isinstance(geometry_latents, SparseTensor) else geometry_latents["feats"]
             ).shape[1]
    if width not in (L, 2 * L):
        raise ValueError(f"decode_geometry needs {L} geometry channels (or all {2 * L}), got {width}")
    z = latent_sparse(geometry_latents, slice(0, L) if width == 2 * L else None, _model_device(model))
    return model.decode_geometry(z, structure)


__all__ = [
    "INDEX_KEY", "LATENT_FORMAT", "EncodeResult", "LatentDataset", "LatentRef", "LatentShardWriter", "LatentStats",
    "Moments", "TokenBudgetBatchSampler", "check_data_resolutions", "collate_latents", "decode", "decode_geometry",
    "encode_dataset", "encode_resolutions", "encode_sample", "latent_sparse", "open_latents",
]
