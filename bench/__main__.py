"""Run every benchmark script in this folder (or those named) and collect their JSON results.

    python -m bench                    # all
    python -m bench sparse_conv        # one
Results go to .interiorfusion/bench/<name>.json and a summary table is printed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    names = argv or sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_"))
    out_dir = Path(".interiorfusion/bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        script = HERE / f"{name}.py"
        if not script.exists():
            print(f"no benchmark named {name!r} in {HERE}", file=sys.stderr)
            return 2
        result = out_dir / f"{name}.json"
        print(f"\n=== {name}", flush=True)
        started = time.perf_counter()
        code = subprocess.call([sys.executable, str(script), "--json", str(result)])
        print(f"=== {name}: exit {code} in {time.perf_counter() - started:.0f} s", flush=True)
        if code != 0:
            failed.append(name)
    print("\nsummary")
    for name in names:
        result = out_dir / f"{name}.json"
        if result.exists():
            data = json.loads(result.read_text())
            headline = data.get("headline") or {k: v for k, v in data.items() if isinstance(v, int | float)}
            print(f"  {name:20} {json.dumps(headline)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
