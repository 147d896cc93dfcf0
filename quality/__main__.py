"""Quality runs: train each suite of configs/quality/ through the pipeline and check its held-out report against
the targets in configs/quality/targets.yaml.

    python -m quality                  # every suite (`make quality`): real sizes, ~20 min per suite on 2 cores
    python -m quality vae              # one suite
    python -m quality --shrink         # every suite shrunk to a few steps: the code path, not the numbers (CI)

Each suite runs `interiorfusion pipeline run` on its pipeline (a copy with the `shrink` overrides under --shrink),
reads the named instance's report (e.g. the VAE's eval.json) from the pipeline's latest run and writes
.interiorfusion/quality/<suite>.json and results.md: each target, the value reached, its baseline and the curve
of the training loss. Exit status: 0 all targets met (or --shrink: every suite ran and reported every metric a
target names), 1 a target missed or a run failed, 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "quality"
OUT = ROOT / ".interiorfusion" / "quality"


def load_suites() -> dict[str, dict[str, Any]]:
    return yaml.safe_load((CONFIGS / "targets.yaml").read_text())


def set_dotted(doc: dict[str, Any], dotted: str, value: Any) -> None:
    node = doc
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def shrunk_pipeline(suite: dict[str, Any], work: Path) -> Path:
    """A copy of the suite's pipeline and stage configs with the `shrink` overrides (curricula dropped: a shrunk
    run trains at the target resolution only), under its own pipeline name so its run records stay apart."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    pipe = yaml.safe_load((CONFIGS / suite["pipeline"]).read_text())
    pipe["name"] = f"{pipe.get('name', 'quality')}-shrunk"
    for name, entry in pipe["stages"].items():
        doc = yaml.safe_load((CONFIGS / entry["config"]).read_text())
        overrides = suite.get("shrink", {}).get(name, {})
        if overrides and "training" in doc:
            doc["training"].pop("curriculum", None)
            doc.get("model", {}).pop("base_resolution", None)
        for dotted, value in overrides.items():
            set_dotted(doc, dotted, value)
        (work / entry["config"]).write_text(yaml.safe_dump(doc, sort_keys=False))
    path = work / suite["pipeline"]
    path.write_text(yaml.safe_dump(pipe, sort_keys=False))
    return path


def check(targets: list[dict[str, Any]], metrics: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for t in targets:
        name = t["metric"]
        value = metrics.get(name)
        base_name = t.get("of")
        base = metrics.get(base_name) if base_name else None
        if value is None or (base_name and base is None):
            rows.append({**t, "value": value, "baseline": base, "met": False, "missing": True})
            continue
        if "min" in t:
            met, goal = value >= t["min"], f"≥ {t['min']}"
        elif "max" in t:
            met, goal = value <= t["max"], f"≤ {t['max']}"
        elif "max_ratio" in t:
            met, goal = value <= t["max_ratio"] * base, f"≤ {t['max_ratio']}× {base_name}"
        else:
            met, goal = value >= t["min_ratio"] * base, f"≥ {t['min_ratio']}× {base_name}"
        rows.append({**t, "value": value, "baseline": base, "goal": goal, "met": bool(met),
                     "ratio": value / base if base else None})
    return rows


def run_suite(name: str, suite: dict[str, Any], shrink: bool) -> dict[str, Any]:
    from interiorfusion_core.config.pipeline import load_pipeline
    from interiorfusion_core.storage import open_store
    from interiorfusion_flows.pipeline import pipeline_store

    pipeline = shrunk_pipeline(suite, OUT / "work" / name) if shrink else CONFIGS / suite["pipeline"]
    start = time.time()
    cmd = [str(Path(sys.executable).parent / "interiorfusion"), "pipeline", "run", "--config", str(pipeline)]
    proc = subprocess.run(cmd, cwd=ROOT)
    seconds = time.time() - start
    result: dict[str, Any] = {"suite": name, "shrunk": shrink, "seconds": round(seconds, 1),
                              "pipeline": str(pipeline), "exit_code": proc.returncode}
    if proc.returncode != 0:
        result["error"] = f"the pipeline exited with {proc.returncode}"
        return result
    cfg, _ = load_pipeline(pipeline)
    record = pipeline_store(cfg).get_json("runs/latest.json")
    uri = record["stages"][suite["instance"]]
    report = json.loads(open_store(uri).get_bytes(suite["report"]))
    result |= {"output": uri, "report": report, "targets": check(suite["targets"], report.get("metrics", {}))}
    result["curve"] = loss_curve(uri)
    return result


def loss_curve(uri: str) -> list[list[float]]:
    """(step, train/loss) of the stage's MLflow run, when the tracking server has it."""
    try:
        from mlflow.tracking import MlflowClient

        from interiorfusion_core.manifest import read_manifest
        from interiorfusion_core.tracking import tracking_uri

        run_id = read_manifest(uri).mlflow_run_id
        if not run_id:
            return []
        history = MlflowClient(tracking_uri()).get_metric_history(run_id, "train/loss")
        return [[m.step, round(m.value, 5)] for m in sorted(history, key=lambda m: m.step)]
    except Exception:  # the curve is a convenience; the report is what is checked
        return []


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| suite | metric | reached | target | baseline | met |", "|---|---|---|---|---|---|"]
    for r in results:
        for t in r.get("targets", []):
            value = "—" if t["value"] is None else f"{t['value']:.4g}"
            base = "—" if t["baseline"] is None else f"{t['baseline']:.4g}"
            lines.append(f"| {r['suite']} | {t['metric']} | {value} | {t.get('goal', 'missing')} | {base} | "
                         f"{'yes' if t['met'] else 'no'} |")
        if "error" in r:
            lines.append(f"| {r['suite']} | — | {r['error']} | | | no |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("suites", nargs="*", help="suites of configs/quality/targets.yaml (default: all)")
    parser.add_argument("--shrink", action="store_true", help="a few steps per suite: checks the code path only")
    args = parser.parse_args(argv)
    suites = load_suites()
    unknown = [s for s in args.suites if s not in suites]
    if unknown:
        print(f"unknown quality suite '{unknown[0]}' (configs/quality/targets.yaml has: {', '.join(suites)})",
              file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.suites or list(suites):
        r = run_suite(name, suites[name], args.shrink)
        (OUT / f"{name}{'-shrunk' if args.shrink else ''}.json").write_text(json.dumps(r, indent=2))
        results.append(r)
    table = markdown(results)
    (OUT / ("results-shrunk.md" if args.shrink else "results.md")).write_text(table)
    print(table)
    failed = [r for r in results if "error" in r]
    if args.shrink:
        failed += [r for r in results if any(t.get("missing") for t in r.get("targets", []))]
    else:
        failed += [r for r in results if not all(t["met"] for t in r.get("targets", []))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
