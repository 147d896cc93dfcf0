"""Data pipeline benchmark: seconds per scene per core, and loader throughput from S3 vs local disk.

    python bench/data_pipeline.py [--scenes 4] [--resolution 256] [--image-size 256] [--views 4] [--json out.json]

Part 1 builds `--scenes` procedural scenes in one process (one core): generate, voxelise at `--resolution`
(plus a 64³ level), render `--views` views of every map at `--image-size`, encode, write the shard; the target
is ≤ 2 s per scene per core at 256³ / 4 × 256 px. Part 2 streams the written dataset with SceneLoader
(`--workers` DataLoader workers) from the local directory and from an S3 server (`rclone serve s3` on
127.0.0.1, started here over the same directory), in the same run: `--rounds` interleaved rounds of local, S3
(the loader's default, `read_ahead: 0`) and S3 with `read_ahead: 4`, `--epochs` passes each, the median
round's whole-pass samples/s of each (worker start-up included: what a stage sees per epoch). Target: S3 ≥ 0.9× local.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import row, write_json
from interiorfusion_core.storage import LocalStore, open_store
from interiorfusion_core.testing import start_s3, stop
from interiorfusion_data.config import DataStageConfig
from interiorfusion_data.loader import SceneLoader, open_dataset
from interiorfusion_data.pipeline import write_dataset


def loader_rate(uri: str, workers: int, epochs: int, resolution: int, batch: int, read_ahead: int = 0
                ) -> dict[str, float]:
    ds = open_dataset(uri, "train", require_manifest=False)
    # Every field (occupancy at `resolution`, all view maps, layout), as a conditioning-stage would read them.
    loader = SceneLoader(ds, batch, resolution=resolution, num_workers=workers, seed=0, read_ahead=read_ahead)
    n, steady_n, steady_t = 0, 0, 0.0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        t_first = None
        for b in loader:
            n += len(b["keys"])
            if t_first is None:
                t_first = time.perf_counter()  # workers are up: steady state starts after the first batch
            else:
                steady_n += len(b["keys"])
        steady_t += time.perf_counter() - (t_first or time.perf_counter())
    dt = time.perf_counter() - t0
    return {"samples": n, "seconds": dt, "samples_per_s": n / dt,
            "steady_samples_per_s": steady_n / steady_t if steady_t else float("nan"),
            "corrupt": loader.metrics()["data/corrupt_samples"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for the loader part")
    ap.add_argument("--epochs", type=int, default=4, help="passes over the data per loader measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the loader measurements")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    cfg = DataStageConfig.model_validate({
        "seed": args.seed, "num_scenes": args.scenes,
        "voxel": {"resolutions": sorted({64, args.resolution})},
        "render": {"views": args.views, "image_size": args.image_size},
        "splits": {"train": 1.0, "val": 0.0, "test": 0.0}, "shards": {"samples_per_shard": 2},
        "num_workers": 0, "preview_samples": 0,
    })
    results: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "json"},
                               "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        work = Path(tmp)
        out = work / "s3root" / "bench" / "ds"
        t0 = time.perf_counter()
        summary = write_dataset(LocalStore(out), cfg, work)
        wall = time.perf_counter() - t0
        per_scene = wall / args.scenes
        t = summary.timings
        phases = {"generate": t.get("t_generate", 0.0), "voxelize": t.get("t_voxelize", 0.0),
                  "render": t.get("t_render", 0.0), "encode": t.get("t_encode", 0.0)}
        phases["write+other"] = max(per_scene - sum(phases.values()), 0.0)
        results["pipeline"] = {"seconds_per_scene": per_scene, "phases": phases, "target_s": 2.0,
                               "voxels": summary.metrics.get(f"mean_voxels_{args.resolution}"),
                               "bytes_per_sample": summary.metrics.get("mean_bytes")}

        server = start_s3(work / "s3root", bucket="bench")
        env = server.env()
        saved = {k: os.environ.get(k) for k in env}
        rounds: dict[str, list[dict[str, float]]] = {"local": [], "s3": [], "s3_read_ahead": []}
        try:
            os.environ.update(env)
            from interiorfusion_core import storage

            storage._S3_CLIENTS.clear()
            # Interleaved, so a neighbour's load falls on every source alike.
            for _ in range(args.rounds):
                rounds["local"].append(loader_rate(str(out), args.workers, args.epochs, args.resolution, 2))
                rounds["s3"].append(loader_rate("s3://bench/ds", args.workers, args.epochs, args.resolution, 2))
                rounds["s3_read_ahead"].append(
                    loader_rate("s3://bench/ds", args.workers, args.epochs, args.resolution, 2, read_ahead=4))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            stop(server.proc)
        med = {name: sorted(rs, key=lambda r: r["samples_per_s"])[len(rs) // 2] for name, rs in rounds.items()}
        local, remote, ahead = med["local"], med["s3"], med["s3_read_ahead"]
        results["loader"] = {**med, "rounds": rounds, "s3_over_local": remote["samples_per_s"] /
                             local["samples_per_s"], "s3_read_ahead_over_local": ahead["samples_per_s"] /
                             local["samples_per_s"], "target_s3_over_local": 0.9}
        assert open_store(str(out)).exists("dataset.json")
    results["headline"] = {
        "seconds_per_scene_per_core": round(results["pipeline"]["seconds_per_scene"], 3),
        "loader_local_samples_per_s": round(local["samples_per_s"], 2),
        "loader_s3_samples_per_s": round(remote["samples_per_s"], 2),
        "s3_over_local": round(results["loader"]["s3_over_local"], 2),
    }

    p = results["pipeline"]
    print(f"\nData pipeline ({args.scenes} scenes, {args.resolution}³ + 64³ occupancy, {args.views} views × "
          f"{args.image_size} px, 1 process)")
    print(f"{'phase':<14}{'s/scene':>10}")
    for k, v in p["phases"].items():
        print(f"{k:<14}{v:>10.3f}")
    print(f"{'total':<14}{p['seconds_per_scene']:>10.3f}   target ≤ {p['target_s']:.1f} s/scene/core "
          f"({'met' if p['seconds_per_scene'] <= p['target_s'] else 'MISSED'})")
    print(f"\nLoader ({args.workers} workers, batch 2, {args.resolution}³ voxels + all maps, {args.epochs} epochs, "
          f"median of {args.rounds} interleaved rounds)")
    print(f"{'source':<17}{'samples':>9}{'seconds':>10}{'samples/s':>11}{'steady/s':>10}")
    for name in ("local", "s3", "s3_read_ahead"):
        r = results["loader"][name]
        print(f"{name:<17}{r['samples']:>9}{r['seconds']:>10.2f}{r['samples_per_s']:>11.2f}"
              f"{r['steady_samples_per_s']:>10.2f}")
    print(f"S3 / local: {results['loader']['s3_over_local']:.2f} (target ≥ 0.9); with read_ahead 4 "
          f"{results['loader']['s3_read_ahead_over_local']:.2f}")
    if args.json:
        standard = (args.resolution, args.views, args.image_size) == (256, 4, 256)  # what the target is for
        views = f"{args.views} view{'s' if args.views > 1 else ''}"
        rows = [
            row(f"generate + voxelise {args.resolution}³ + render {views} × all maps at {args.image_size} px"
                " + write, 1 process", p["seconds_per_scene"], "s/scene/core",
                target=f"≤ {p['target_s']:g} s" if standard else None),
            row(f"loader, {args.workers} workers, {args.resolution}³ + all maps: S3 (rclone serve s3), whole passes",
                remote["samples_per_s"], "samples/s", "local disk", local["samples_per_s"], target="≥ 0.9×"),
            row("loader from S3 with read_ahead: 4", ahead["samples_per_s"], "samples/s",
                "local disk", local["samples_per_s"]),
        ]
        write_json(args.json, "data_pipeline", rows, results, headline=results["headline"])
    return results


if __name__ == "__main__":
    main()
