"""Run every benchmark script in this folder (or those named) and collect their results in one table.

    python -m bench                    # all (`make bench`)
    python -m bench sparse_conv        # one
    python -m bench --quick            # all at small sizes: checks the scripts and the table, measures nothing
    python -m bench --readme           # README.md's benchmark table := the last full run's results.md

Each script runs as `python bench/<name>.py --json .interiorfusion/bench/<name>.json` and writes the rows of its
headline figures (bench/_report.py: figure, value, unit, same-run baseline, ratio, target). They are collected
into .interiorfusion/bench/results.json (with the machine: cores, load average, torch, git commit, date) and
results.md (the Markdown table). Exit status 1 when a script failed (non-zero exit or no rows written), 2 for a
usage error; the table is written either way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from bench._report import ROOT, machine_info, main_readme, markdown  # noqa: E402

# --quick: the same code paths at sizes that take seconds (the figures mean nothing).
QUICK_ARGS = {
    "sparse_conv": ["--resolution", "64", "--voxels", "5000", "--reps", "1", "--threads", "1"],
    "vae_scaling": ["--resolutions", "32", "64", "--reps", "1", "--render-views", "1", "--budget-s", "10"],
    "data_pipeline": ["--scenes", "4", "--resolution", "64", "--image-size", "32", "--views", "1", "--epochs", "1"],
    "engine_overhead": ["--steps", "20", "--warmup", "2", "--rounds", "1", "--width", "128"],
    "dit_block": ["--width", "64", "--heads", "2", "--mlp", "128", "--tokens", "256", "--cond-tokens", "16",
                  "--grid", "16", "--reps", "1", "--threads", "1"],
    "gpu_check": ["--no-vae", "--steps", "1", "--encode-scenes", "3"],
    "structure_feature_cache": ["--images", "4", "--image-size", "64", "--batch", "2", "--epochs", "2",
                                "--hidden", "64", "--layers", "2"],
}


# Table order; scripts not named here follow alphabetically.
ORDER = ["sparse_conv", "vae_scaling", "data_pipeline", "engine_overhead", "dit_block", "structure_feature_cache",
         "gpu_check"]


def discover(scripts: Path) -> list[str]:
    names = sorted(p.stem for p in scripts.glob("*.py") if not p.stem.startswith("_"))
    return sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))


def run_one(name: str, script: Path, result: Path, extra: list[str]) -> dict[str, Any]:
    result.unlink(missing_ok=True)  # never report a previous run's figures
    print(f"\n=== {name}", flush=True)
    started = time.perf_counter()
    code = subprocess.call([sys.executable, str(script), "--json", str(result), *extra])
    seconds = time.perf_counter() - started
    print(f"=== {name}: exit {code} in {seconds:.0f} s", flush=True)
    entry: dict[str, Any] = {"benchmark": name, "script": str(script), "args": extra, "exit": code,
                             "seconds": round(seconds, 1), "rows": [], "machine": None}
    if code != 0:
        entry["error"] = f"exit {code}"
        return entry
    try:
        data = json.loads(result.read_text())
        rows = data["rows"]
        if not isinstance(rows, list) or not rows:
            raise ValueError("no rows")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        entry["error"] = f"no result rows in {result} ({type(exc).__name__}: {exc})"
        return entry
    entry["rows"], entry["machine"] = rows, data.get("machine")
    return entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="benchmarks to run (default: every bench/*.py not starting with _)")
    ap.add_argument("--quick", action="store_true", help="small sizes: a check of the scripts, not a measurement")
    ap.add_argument("--out", type=Path, default=ROOT / ".interiorfusion" / "bench",
                    help="results folder (default: .interiorfusion/bench in the checkout)")
    ap.add_argument("--scripts", type=Path, default=HERE, help=argparse.SUPPRESS)  # tests: a folder of fakes
    ap.add_argument("--readme", nargs="?", type=Path, const=ROOT / "README.md", default=None, metavar="README",
                    help="run nothing: replace README's marked benchmark block with OUT/results.md")
    args = ap.parse_args(argv)

    results_md = args.out / "results.md"
    if args.readme is not None:
        return main_readme(args.readme, results_md)

    available = discover(args.scripts)
    unknown = [n for n in args.names if n not in available]
    if unknown:
        print(f"no benchmark named {', '.join(map(repr, unknown))} in {args.scripts} "
              f"(there are: {', '.join(available)})", file=sys.stderr)
        return 2
    names = args.names or available
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    machine = machine_info()
    started = time.perf_counter()
    benchmarks = [run_one(n, args.scripts / f"{n}.py", args.out / f"{n}.json",
                          QUICK_ARGS.get(n, []) if args.quick else []) for n in names]
    failed = [b["benchmark"] for b in benchmarks if "error" in b]
    results = {"machine": machine, "load_average_end": [round(x, 2) for x in os.getloadavg()],
               "total_s": round(time.perf_counter() - started, 1), "quick": args.quick,
               "partial": set(names) != set(available), "failed": failed, "benchmarks": benchmarks}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    text = markdown(results)
    results_md.write_text(text)
    print(f"\n{text}\nwrote {args.out / 'results.json'} and {results_md}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
