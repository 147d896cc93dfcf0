"""Scene → sample (voxelise, place cameras, render, encode) and dataset → shards (plan, build, write, index).

Used by the stage and by `interiorfusion data synth`. A scene's bytes depend only on the config and its index,
never on worker count or run order, so a resumed or parallel run writes the same shards.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from interiorfusion_core.errors import UserError
from interiorfusion_core.storage import ArtifactStore, open_store
from interiorfusion_data.config import DataStageConfig
from interiorfusion_data.edits import edit_rng, edit_scene
from interiorfusion_data.format import DATASET_FORMAT, INDEX_FORMAT, EncodedSample, encode_sample, json_bytes
from interiorfusion_data.frame import VoxelFrame, fit_frame, metric_frame
from interiorfusion_data.procedural import ProceduralOptions, generate_scene
from interiorfusion_data.render import orbit_cameras, place_cameras, render, scale_camera, scene_lights
from interiorfusion_data.scene import CLASSES, Scene
from interiorfusion_data.shards import ShardWriter, index_name, shard_name
from interiorfusion_data.voxelize import CHANNELS, VoxelGrid, downsample_labeled, scene_face_attrs, voxelize

log = logging.getLogger("interiorfusion_data")
SPLITS = ("train", "val", "test")


def procedural_options(cfg: DataStageConfig) -> ProceduralOptions:
    p = cfg.procedural
    return ProceduralOptions(tuple(p.room_kinds), tuple(p.size_range), tuple(p.archetypes), p.min_objects,
                             p.max_objects)


def camera_rng(seed: int, index: int) -> np.random.Generator:
    # A stream separate from the scene's own, so camera choices never shift the geometry.
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 1]))


def scene_cameras(scene: Scene, cfg: DataStageConfig, rng: np.random.Generator) -> list:
    r = cfg.render
    if r.views == 0:
        return []
    if scene.cameras:
        return [scale_camera(c, r.image_size, r.image_size) if c.width != r.image_size else c
                for c in scene.cameras[: r.views]]
    mode = cfg.importer.camera_mode
    if mode == "orbit" or (mode == "auto" and scene.floor_polygon is None):
        return orbit_cameras(scene, rng, r.views, r.image_size)
    if scene.floor_polygon is None:
        lo, hi = scene.bounds()
        scene.floor_polygon = np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]])
    return place_cameras(scene, rng, r.views, r.image_size, tuple(r.fov_deg))


def sample_frame(scene: Scene, cfg: DataStageConfig) -> VoxelFrame:
    lo, hi = scene.bounds()
    v = cfg.voxel
    return (fit_frame(lo, hi, v.margin) if v.cube_size == "fit"
            else metric_frame(lo, hi, v.cube_size, v.floor_height, v.margin, scene.name))


def build_sample(scene: Scene, cfg: DataStageConfig, index: int, *, frame: VoxelFrame | None = None,
                 cameras: list | None = None, lights: np.ndarray | None = None,
                 edit: dict[str, Any] | None = None) -> EncodedSample:
    """Voxelise at the finest resolution (coarser levels by exact downsampling), render every view, encode.
    `frame`, `cameras`, `lights`: given instead of derived from the scene (an edited scene keeps its original's);
    `edit`: the edit record stored in the sample's meta."""
    t0 = time.perf_counter()
    frame = frame if frame is not None else sample_frame(scene, cfg)
    origin, side = frame.origin, frame.cube_size
    attrs = scene_face_attrs(scene.face_material, scene.face_normals())
    res = cfg.voxel.resolutions
    finest = max(res)
    fine = voxelize(scene.triangles, attrs, finest, origin, side / finest, face_class=scene.face_class,
                    face_instance=scene.face_instance)
    grids = []
    for r in res:
        if r == finest:
            grids.append(fine)
        else:
            c, a, lab, inst = downsample_labeled(fine.coords, fine.attrs, finest // r, fine.labels, fine.instances)
            grids.append(VoxelGrid(c, a, r, origin, side / r, lab, inst))
    t1 = time.perf_counter()
    cams = cameras if cameras is not None else scene_cameras(scene, cfg, camera_rng(cfg.seed, index))
    normals = scene.face_normals()
    lights = lights if lights is not None else scene_lights(scene)
    renders = [render(scene, cam, normals, lights) for cam in cams]
    if scene.frames:
        # Captured colour and depth replace the renders'; normal/semantic/instance stay rendered from the mesh.
        renders = [replace(r, rgb=rgb, depth=depth) for r, (rgb, depth) in zip(renders, scene.frames, strict=False)]
        lights = None
    t2 = time.perf_counter()
    sample = encode_sample(scene.name, scene, grids, cams, renders, origin, side, cfg.render.png_compress_level,
                           lights=lights, frame=frame.to_meta(), edit=edit)
    t3 = time.perf_counter()
    sample.stats.update(t_voxelize=t1 - t0, t_render=t2 - t1, t_encode=t3 - t2)
    return sample


# ---------------------------------------------------------------------------------------------- sources
class SourcePart:
    """One source's scenes: procedural (index → seed) or an importer's sorted item list. `cfg` is that source's
    single-source config; `start` its first index in the dataset; `prefix` starts its sample keys (multi-source)."""

    def __init__(self, cfg: DataStageConfig, import_root: Path | None, start: int = 0, prefix: str | None = None):
        self.cfg, self.start, self.prefix = cfg, start, prefix
        self.importer = None
        if cfg.source == "procedural":
            self.count = cfg.num_scenes or 0
            self.opts = procedural_options(cfg)
        else:
            from interiorfusion_data.importers import make_importer

            if import_root is None:
                raise UserError(f"source '{cfg.source}' needs importer.path")
            self.importer = make_importer(cfg.source, import_root, cfg)
            self.items = self.importer.items()
            self.count = len(self.items) if cfg.num_scenes is None else min(len(self.items), cfg.num_scenes)

    @property
    def simulated(self) -> bool:
        return self.cfg.importer.simulate is not None

    def scene(self, local: int) -> Scene:
        if self.importer is None:
            scene = generate_scene(self.cfg.seed, local, self.opts)
        else:
            scene = self.importer.load(self.items[local])
            # Imported names can repeat (same stem, other extension): the index makes the sample key unique.
            scene.name = f"{scene.name}-{local:06d}"
            if self.simulated:
                scene.meta["simulated"] = True
        if self.prefix:
            scene.name = f"{self.prefix}-{scene.name}"
        return scene


class SceneSource:
    """Numbered scenes of the dataset: those of its one source, or of every `sources` entry in order (entry k's
    scenes follow entry k − 1's; their keys start with the entry's source)."""

    def __init__(self, cfg: DataStageConfig, import_roots: Sequence[Path | None] | Path | None = None):
        self.cfg = cfg
        parts = cfg.source_parts()
        roots = list(import_roots) if isinstance(import_roots, list | tuple) else [import_roots] * len(parts)
        if len(roots) != len(parts):
            raise ValueError(f"{len(roots)} import roots for {len(parts)} sources")
        self.parts: list[SourcePart] = []
        start = 0
        for (prefix, part_cfg), root in zip(parts, roots, strict=True):
            self.parts.append(SourcePart(part_cfg, root, start, prefix))
            start += self.parts[-1].count
        self.count = start

    def part(self, index: int) -> SourcePart:
        if not 0 <= index < self.count:
            raise IndexError(f"scene {index} of {self.count}")
        return next(p for p in reversed(self.parts) if p.start <= index)

    def config(self, index: int) -> DataStageConfig:
        """The single-source config scene `index` is built with (its source's)."""
        return self.part(index).cfg

    def scene(self, index: int) -> Scene:
        part = self.part(index)
        return part.scene(index - part.start)


def resolve_import_root(cfg: DataStageConfig, work_dir: Path, tag: str | None = None) -> Path | None:
    """A local folder for a single-source config's importer: the path itself, a copy of an s3:// / file://
    prefix, or (`importer.simulate`) the scans simulated into `work_dir`. `tag` names its work-dir folders."""
    if cfg.source == "procedural":
        return None
    sim = cfg.importer.simulate
    if sim is not None:
        from interiorfusion_data.scan_layouts import simulate_scans

        t0 = time.perf_counter()
        dest = simulate_scans(cfg.source, work_dir / ("simulated" if tag is None else f"simulated-{tag}"), sim,
                              procedural_options(cfg))
        log.info("simulated %d %s scans in %.1f s", sim.num_scenes, cfg.source, time.perf_counter() - t0)
        return dest
    path = str(cfg.importer.path)
    if "://" not in path:
        p = Path(path).expanduser()
        if not p.exists():
            raise UserError(f"importer.path: {path} does not exist")
        return p
    store = open_store(path)
    dest = work_dir / ("import" if tag is None else f"import-{tag}")
    keys = list(store.list())
    if not keys:
        raise UserError(f"importer.path: {path} holds no files")
    for key in keys:
        store.get_file(key, dest / key)
    return dest


def resolve_import_roots(cfg: DataStageConfig, work_dir: Path) -> list[Path | None]:
    """Each source's local import folder (None for procedural), in `source_parts` order."""
    parts = cfg.source_parts()
    return [resolve_import_root(part, work_dir, None if len(parts) == 1 else f"{k}-{part.source}")
            for k, (_, part) in enumerate(parts)]


# Worker-process state: one source per process (importers parse their listing once).
_WORKER: dict[str, Any] = {}


def _init_worker(cfg_json: dict[str, Any], import_roots: list[str | None]) -> None:
    cfg = DataStageConfig.model_validate(cfg_json)
    _WORKER["cfg"] = cfg
    _WORKER["source"] = SceneSource(cfg, [Path(r) if r else None for r in import_roots])


def _build_in_worker(index: int) -> EncodedSample | None:
    if index >= EDIT_BASE:
        return _build_edit(*divmod(index - EDIT_BASE, EDIT_STRIDE))
    t0 = time.perf_counter()
    source: SceneSource = _WORKER["source"]
    scene = source.scene(index)
    t1 = time.perf_counter()
    sample = build_sample(scene, source.config(index), index)
    sample.stats["t_generate"] = t1 - t0
    return sample


# Edit tasks share the build stream with scenes: task EDIT_BASE + index·EDIT_STRIDE + k is edit k of scene `index`.
EDIT_BASE = 1 << 48
EDIT_STRIDE = 1 << 12


def edit_task(index: int, k: int) -> int:
    return EDIT_BASE + index * EDIT_STRIDE + k


def edit_key(original_key: str, k: int) -> str:
    return f"{original_key}-edit{k}"


def _build_edit(index: int, k: int) -> EncodedSample | None:
    """Edit k of scene `index` in the original's frame, cameras and lights; None when the scene has nothing to edit
    (the shard records the planned count, so a resume does not take the missing sample for an unfinished shard)."""
    t0 = time.perf_counter()
    source: SceneSource = _WORKER["source"]
    cfg = source.config(index)
    edits = cfg.edits
    assert edits is not None
    scene = source.scene(index)
    edit = edit_scene(scene, edit_rng(cfg.seed, index, k), tuple(edits.kinds), tuple(edits.shift_m))
    if edit is None:
        return None
    key = edit_key(scene.name, k)
    edit.scene.name = key
    record = {"of": scene.name, "kind": edit.kind, "instance": edit.instance, "class": edit.label,
              "boxes": np.round(edit.boxes, 6).tolist()}
    t1 = time.perf_counter()
    sample = build_sample(edit.scene, cfg, index, frame=sample_frame(scene, cfg),
                          cameras=scene_cameras(scene, cfg, camera_rng(cfg.seed, index)), lights=scene_lights(scene),
                          edit=record)
    sample.index = {"pairs": edit.pairs(scene.name, key, tuple(edits.kinds))}
    sample.stats["t_generate"] = t1 - t0
    return sample


@dataclass
class ShardPlan:
    split: str
    number: int
    indices: list[int]

    @property
    def key(self) -> str:
        return f"{self.split}/{shard_name(self.number)}"

    @property
    def index_key(self) -> str:
        return f"{self.split}/{index_name(shard_name(self.number))}"


def split_counts(n: int, cfg: DataStageConfig) -> dict[str, int]:
    fr = {"train": cfg.splits.train, "val": cfg.splits.val, "test": cfg.splits.test}
    counts = {s: math.floor(n * f) for s, f in fr.items()}
    # Hand out the remainder by largest fractional part, but never leave a requested split empty if n allows.
    rest = n - sum(counts.values())
    for s in sorted(fr, key=lambda s: (-(n * fr[s] - counts[s]), SPLITS.index(s)))[:rest]:
        counts[s] += 1
    for s in ("val", "test"):
        if fr[s] > 0 and counts[s] == 0 and counts["train"] > 1:
            counts[s], counts["train"] = 1, counts["train"] - 1
    return counts


def plan_shards(n: int, cfg: DataStageConfig) -> list[ShardPlan]:
    order = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), 7])).permutation(n).tolist()
    counts = split_counts(n, cfg)
    plans, pos = [], 0
    for split in SPLITS:
        chosen = sorted(order[pos:pos + counts[split]])
        pos += counts[split]
        per = cfg.shards.samples_per_shard
        for k in range(0, len(chosen), per):
            plans.append(ShardPlan(split, k // per, chosen[k:k + per]))
    return plans


def edit_split(split: str) -> str:
    return f"edits-{split}"


def plan_edit_shards(plans: list[ShardPlan], source: SceneSource, cfg: DataStageConfig) -> list[ShardPlan]:
    """The shards of edited scenes (`edits-<split>`): edits.per_scene of every procedural scene of edits.splits."""
    if cfg.edits is None:
        return []
    out = []
    for split in cfg.edits.splits:
        tasks = [edit_task(i, k) for p in plans if p.split == split for i in p.indices
                 if source.config(i).source == "procedural" for k in range(cfg.edits.per_scene)]
        per = cfg.shards.samples_per_shard
        out += [ShardPlan(edit_split(split), k // per, tasks[k:k + per]) for k in range(0, len(tasks), per)]
    return out


@dataclass
class WriteSummary:
    dataset: dict[str, Any]
    metrics: dict[str, float]
    built: int = 0
    adopted: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def build_samples(cfg: DataStageConfig, import_roots: Sequence[Path | None], indices: list[int]
                  ) -> Iterator[EncodedSample]:
    """Samples for `indices`, in order; in worker processes when cfg.num_workers > 1. `import_roots`: one per
    source (resolve_import_roots)."""
    roots = [str(r) if r else None for r in import_roots]
    if cfg.num_workers <= 1:
        _init_worker(cfg.model_dump(mode="json"), roots)
        for i in indices:
            yield _build_in_worker(i)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(cfg.num_workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(cfg.model_dump(mode="json"), roots)) as ex:
        # In order, with a bounded window: Executor.map would submit everything at once and could hold
        # thousands of finished samples (tens of MB each at 1024³) in memory behind one slow scene.
        window = 2 * cfg.num_workers
        pending: deque = deque()
        it = iter(indices)
        for i in it:
            pending.append(ex.submit(_build_in_worker, i))
            if len(pending) >= window:
                break
        while pending:
            sample = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(ex.submit(_build_in_worker, nxt))
            yield sample


def write_dataset(
    store: ArtifactStore,
    cfg: DataStageConfig,
    work_dir: Path,
    *,
    resumed: bool = False,
    on_shard: Callable[[ShardPlan, dict[str, Any], dict[str, float]], None] | None = None,
) -> WriteSummary:
    """Build and write every shard and `dataset.json` (last) under `store`."""
    import_roots = resolve_import_roots(cfg, work_dir)
    source = SceneSource(cfg, import_roots)
    if source.count == 0:
        raise UserError("the data source yielded no scenes")
    plans = plan_shards(source.count, cfg)
    plans += plan_edit_shards(plans, source, cfg)
    splits: dict[str, dict[str, Any]] = {s: {"num_samples": 0, "shards": []} for s in SPLITS}
    splits |= {p.split: {"num_samples": 0, "shards": []} for p in plans}
    totals: dict[str, float] = {}
    built = adopted = 0
    adopt = getattr(store, "adopt", None)
    t_start = time.perf_counter()
    todo: list[ShardPlan] = []
    indexes: dict[str, dict[str, Any]] = {}
    for plan in plans:
        # The plan is a function of the config, and a resume always has the same config (the run marker's
        # cache key), so a shard whose index exists with the planned sample count is complete.
        if resumed and store.exists(plan.index_key) and store.exists(plan.key):
            idx = store.get_json(plan.index_key)
            planned = idx.get("planned", len(idx.get("samples", [])))  # edit shards: some scenes have no edit
            if idx.get("format") == INDEX_FORMAT and planned == len(plan.indices):
                if adopt is not None:
                    adopt(plan.key)
                    adopt(plan.index_key)
                indexes[plan.key] = idx
                adopted += 1
                continue
        todo.append(plan)
    flat = [i for p in todo for i in p.indices]
    stream = build_samples(cfg, import_roots, flat)
    # Progress on stderr (shown on a terminal, silent in logs and tests).
    progress = tqdm(total=len(flat), desc="data: scenes", unit="scene", disable=None, leave=False)
    for plan in todo:
        tmp = work_dir / f"{plan.split}-{shard_name(plan.number)}"
        writer = ShardWriter(tmp, shard_name(plan.number))
        shard_stats: dict[str, float] = {}
        for _ in plan.indices:
            sample = next(stream)
            progress.update(1)
            if sample is None:  # an edit of a scene with no movable object
                continue
            writer.add(sample)
            for k, v in sample.stats.items():
                shard_stats[k] = shard_stats.get(k, 0.0) + v
        idx = writer.close()
        if plan.split not in SPLITS:
            idx["planned"] = len(plan.indices)
        store.put_file(plan.key, tmp)
        tmp.unlink(missing_ok=True)
        # The index goes second: its presence marks the shard complete (resume relies on it).
        store.put_bytes(plan.index_key, json_bytes(idx) + b"\n")
        indexes[plan.key] = idx
        built += 1
        for k, v in shard_stats.items():
            totals[k] = totals.get(k, 0.0) + v
        if on_shard is not None:
            on_shard(plan, idx, shard_stats)
    progress.close()
    for plan in plans:
        idx = indexes[plan.key]
        entry = {"shard": plan.key, "index": plan.index_key, "num_samples": len(idx["samples"]),
                 "size": idx["size"], "sha256": idx["sha256"]}
        splits[plan.split]["shards"].append(entry)
        splits[plan.split]["num_samples"] += entry["num_samples"]
    pairs: dict[str, list[dict[str, Any]]] = {}
    for plan in plans:
        if plan.split not in SPLITS:
            split = plan.split.removeprefix("edits-")
            pairs.setdefault(split, []).extend(p for s in indexes[plan.key]["samples"] for p in s.get("pairs", []))
    dataset = {
        "format": DATASET_FORMAT, "name": cfg.dataset, "source": "+".join(p.cfg.source for p in source.parts),
        "sources": [{"source": p.cfg.source, "key_prefix": p.prefix, "num_scenes": p.count, "simulated": p.simulated}
                    for p in source.parts],
        "seed": cfg.seed,
        "classes": list(CLASSES), "channels": list(CHANNELS), "resolutions": cfg.voxel.resolutions,
        "views": cfg.render.views, "image_size": cfg.render.image_size, "splits": splits,
    }
    if cfg.edits is not None:
        # Edit pairs per split: `before` / `after` name samples of `<split>` or `edits-<split>` (edits.py).
        dataset["edits"] = {split: {"num_pairs": len(pairs.get(split, [])), "pairs": pairs.get(split, [])}
                            for split in cfg.edits.splits}
    store.put_bytes("dataset.json", json_bytes(dataset) + b"\n")
    n_built = sum(len(p.indices) for p in todo)
    metrics = {
        "scenes": float(source.count), "shards": float(len(plans)),
        "shards_built": float(built), "shards_adopted": float(adopted),
        "train_samples": float(splits["train"]["num_samples"]), "val_samples": float(splits["val"]["num_samples"]),
        "test_samples": float(splits["test"]["num_samples"]),
        "bytes_total": float(sum(s["size"] for sp in splits.values() for s in sp["shards"])),
    }
    if cfg.edits is not None:
        metrics["edit_samples"] = float(sum(splits[edit_split(s)]["num_samples"] for s in cfg.edits.splits
                                            if edit_split(s) in splits))
        metrics["edit_pairs"] = float(sum(len(v) for v in pairs.values()))
    for p in source.parts:
        metrics[f"scenes_{p.cfg.source}"] = metrics.get(f"scenes_{p.cfg.source}", 0.0) + p.count
    if n_built:
        metrics["seconds_per_scene"] = (time.perf_counter() - t_start) / n_built
        for k, v in totals.items():
            metrics[f"mean_{k}"] = v / n_built
    return WriteSummary(dataset, metrics, built, adopted, {k: v / max(n_built, 1) for k, v in totals.items()
                                                           if k.startswith("t_")})

