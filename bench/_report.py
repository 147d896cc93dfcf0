"""The one results format of the benchmarks, the summary table and the README block made from it.

Every script in bench/ takes `--json PATH` and writes, through `write_json`,

    {"benchmark": "sparse_conv",
     "rows": [{"figure": "...", "value": 0.52, "unit": "s",
               "baseline": "spconv-native, 1 thread", "baseline_value": 0.85, "ratio": 0.61, "target": "≤ 0.5 s"}],
     "machine": {"cores": 2, "load_average": [...], "torch": "...", "git_commit": "...", "date": "..."},
     "headline": {...}, "details": {...}}

A row is one headline figure; `baseline` names the comparison measured in the same run (null when there is none)
and `ratio` is value / baseline_value. `details` keeps everything else the script measured. `python -m bench`
collects these into results.json and results.md; `python -m bench --readme` copies results.md into README.md
between the `<!-- bench:begin -->` and `<!-- bench:end -->` lines.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"
COLUMNS = ("benchmark", "figure", "result", "same-run baseline", "ratio", "target")


def row(figure: str, value: float | None, unit: str = "", baseline: str | None = None,
        baseline_value: float | None = None, target: str | None = None, ratio: float | None = None) -> dict[str, Any]:
    """One headline figure; `ratio` defaults to value / baseline_value."""
    if ratio is None and value is not None and baseline_value:
        ratio = value / baseline_value
    return {"figure": figure, "value": value, "unit": unit, "baseline": baseline, "baseline_value": baseline_value,
            "ratio": ratio, "target": target}


def git_commit(root: Path = ROOT) -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + (" (with local changes)" if dirty else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(**extra: Any) -> dict[str, Any]:
    """Where and when: cores, load average, torch version, git commit, UTC date (+ whatever the caller adds)."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "torch": None,
        "git_commit": git_commit(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return info | extra


def _clean(obj: Any) -> Any:
    """JSON without NaN/inf (written as null) and with paths and other objects as strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if obj is None or isinstance(obj, str | int | bool):
        return obj
    return str(obj)


def write_json(path: Path | str, benchmark: str, rows: Iterable[Mapping[str, Any]], details: Mapping[str, Any],
               headline: Mapping[str, Any] | None = None, **machine: Any) -> dict[str, Any]:
    payload = {"benchmark": benchmark, "rows": list(rows), "machine": machine_info(**machine),
               "headline": dict(headline or {}), "details": dict(details)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(payload), indent=2))
    print(f"wrote {path}")
    return payload


# ---- table ------------------------------------------------------------------------------------------------
def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float):
        text = str(value)
    elif isinstance(value, int) or abs(value) >= 1000:
        text = f"{value:,.0f}"
    else:
        text = f"{value:.3g}"
    if not unit:
        return text
    return f"{text}{unit}" if unit in ("×", "%") or unit.startswith("/") else f"{text} {unit}"


def fmt_ratio(ratio: Any) -> str:
    if not isinstance(ratio, int | float) or isinstance(ratio, bool):
        return "—"
    return f"{ratio:.0f}×" if abs(ratio) >= 100 else f"{ratio:#.3g}×"


def table_rows(benchmarks: Iterable[Mapping[str, Any]]) -> list[list[str]]:
    out = []
    for bench in benchmarks:
        name = f"`{bench['benchmark']}`"
        if bench.get("exit") not in (0, None) or not bench.get("rows"):
            why = bench.get("error") or f"exit {bench.get('exit')}"
            out.append([name, "—", f"**failed** ({why})", "—", "—", "—"])
            continue
        for r in bench["rows"]:
            unit = r.get("unit") or ""
            base = "—"
            if r.get("baseline"):
                base = r["baseline"] + (f": {fmt(r['baseline_value'], unit)}" if r.get("baseline_value") is not None
                                        else "")
            ratio = fmt_ratio(r.get("ratio"))
            out.append([name, r["figure"], fmt(r.get("value"), unit), base, ratio, r.get("target") or "—"])
    return out


def markdown(results: Mapping[str, Any]) -> str:
    """results.md: a line on the machine and the run, then the table."""
    m = results["machine"]
    load = "/".join(f"{x:.2f}" for x in m.get("load_average") or [])
    load_end = "/".join(f"{x:.2f}" for x in results.get("load_average_end") or [])
    lines = [
        f"Measured {m['date']} on {m['cores']} CPU cores ({m.get('cpu') or '?'}"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f"), load average (1/5/15 min) {load} at the start and {load_end} at the end, torch {m.get('torch')}, "
        f"commit {m.get('git_commit')}; the whole run took {results['total_s']:.0f} s"
        + (" (--quick: small sizes, not the benchmark figures)" if results.get("quick") else "") + ".",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
              for cells in table_rows(results["benchmarks"])]
    return "\n".join(lines) + "\n"


# ---- README -----------------------------------------------------------------------------------------------
class MarkerError(ValueError):
    pass


def replace_block(text: str, block: str, begin: str = BEGIN, end: str = END) -> str:
    """`text` with everything between the `begin` and `end` marker lines replaced by `block`."""
    if text.count(begin) != 1 or text.count(end) != 1:
        raise MarkerError(f"expected exactly one {begin!r} and one {end!r} line, found {text.count(begin)} and "
                          f"{text.count(end)}")
    if text.index(end) < text.index(begin):
        raise MarkerError(f"{end!r} comes before {begin!r}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{block.strip()}\n{end}{tail}"


def update_readme(readme: Path, results_md: Path) -> None:
    """Replace README's marked block with results.md (refused for a --quick run's results)."""
    results_json = results_md.with_suffix(".json")
    results = json.loads(results_json.read_text()) if results_json.exists() else {}
    if results.get("quick") or results.get("partial"):
        raise ValueError(f"{results_json} is from a {'--quick' if results.get('quick') else 'partial'} run; "
                         "run `make bench` in full first")
    readme.write_text(replace_block(readme.read_text(), results_md.read_text()))


def main_readme(readme: Path, results_md: Path) -> int:
    if not results_md.exists():
        print(f"{results_md}: no results yet; run `make bench` first", file=sys.stderr)
        return 2
    try:
        update_readme(readme, results_md)
    except ValueError as exc:
        print(f"{readme}: not updated: {exc}", file=sys.stderr)
        return 2
    print(f"{readme}: benchmark table replaced by {results_md}")
    return 0
