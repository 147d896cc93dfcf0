"""`python -m bench` (the runner behind `make bench`), its results table and the README block made from it, on
fake benchmark scripts; and the real bench scripts' command lines (every one takes --json PATH)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from testservers import REPO

_spec = importlib.util.spec_from_file_location("bench_report", REPO / "bench" / "_report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

FAKE = """\
import argparse, json, pathlib, sys
ap = argparse.ArgumentParser()
ap.add_argument("--json", type=pathlib.Path, required=True)
args = ap.parse_args()
{body}
"""
OK_ROWS = [{"figure": "widget fwd+bwd", "value": 0.25, "unit": "s", "baseline": "reference widget",
            "baseline_value": 0.5, "ratio": 0.5, "target": "≤ 0.3 s"},
           {"figure": "widgets built", "value": 12, "unit": "", "baseline": None, "baseline_value": None,
            "ratio": None, "target": None}]


def fake_bench(folder: Path, **scripts: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        (folder / f"{name}.py").write_text(FAKE.format(body=textwrap.dedent(body)))
    (folder / "_helper.py").write_text("raise SystemExit('a helper is not a benchmark')\n")
    return folder


def ok_script(rows: list[dict] = OK_ROWS) -> str:
    return f"args.json.write_text(json.dumps({{'benchmark': 'ok', 'rows': {rows!r}, 'machine': {{}}}}))"


def run_bench(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_runner_writes_one_table_and_exits_nonzero_when_a_script_fails(tmp_path: Path) -> None:
    scripts = fake_bench(tmp_path / "bench", ok=ok_script(), broken="sys.exit(3)",
                         silent="print('measured, but wrote nothing')")
    out = tmp_path / "out"
    out.mkdir()
    (out / "silent.json").write_text(json.dumps({"benchmark": "silent", "rows": OK_ROWS}))  # a previous run's
    proc = run_bench("--scripts", scripts, "--out", out)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "failed: broken, silent" in proc.stderr

    results = json.loads((out / "results.json").read_text())
    assert results["failed"] == ["broken", "silent"]
    by_name = {b["benchmark"]: b for b in results["benchmarks"]}
    assert set(by_name) == {"ok", "broken", "silent"}  # _helper.py is not run
    assert by_name["ok"]["exit"] == 0 and by_name["ok"]["rows"] == OK_ROWS
    assert by_name["broken"]["exit"] == 3 and by_name["broken"]["rows"] == []
    assert by_name["silent"]["exit"] == 0 and "no result rows" in by_name["silent"]["error"]
    assert not (out / "silent.json").exists()  # the stale file was removed, not reported
    for key in ("date", "cores", "load_average", "torch", "git_commit"):
        assert key in results["machine"]
    assert results["load_average_end"] and results["total_s"] >= 0

    md = (out / "results.md").read_text()
    assert "| benchmark | figure | result | same-run baseline | ratio | target |" in md
    assert "| `ok` | widget fwd+bwd | 0.25 s | reference widget: 0.5 s | 0.500× | ≤ 0.3 s |" in md
    assert "| `ok` | widgets built | 12 | — | — | — |" in md
    assert "| `broken` | — | **failed** (exit 3) |" in md
    assert "| `silent` | — | **failed** (no result rows" in md
    assert md.startswith("Measured ") and " CPU cores " in md


def test_runner_exits_zero_when_every_script_passes(tmp_path: Path) -> None:
    scripts = fake_bench(tmp_path / "bench", ok=ok_script(), other=ok_script(OK_ROWS[:1]))
    proc = run_bench("--scripts", scripts, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["failed"] == [] and not results["partial"] and not results["quick"]
    assert [len(b["rows"]) for b in results["benchmarks"]] == [2, 1]  # alphabetical: ok, other

    assert run_bench("--scripts", scripts, "--out", tmp_path / "one", "other").returncode == 0
    assert json.loads((tmp_path / "one" / "results.json").read_text())["partial"]
    proc = run_bench("--scripts", scripts, "--out", tmp_path / "out", "nosuch")
    assert proc.returncode == 2 and "no benchmark named 'nosuch'" in proc.stderr


README = """\
# Project

## Benchmarks

How to run: `make bench`.

<!-- bench:begin -->
| old | table |
|---|---|
| 1 | 2 |
<!-- bench:end -->

More text | with a pipe.

## Tests
"""


def test_readme_block_is_replaced_and_nothing_else() -> None:
    new = report.replace_block(README, "| new |\n|---|\n| 3 |\n")
    head, tail = README.split("<!-- bench:begin -->")[0], README.split("<!-- bench:end -->")[1]
    assert new == head + "<!-- bench:begin -->\n| new |\n|---|\n| 3 |\n<!-- bench:end -->" + tail
    assert report.replace_block(new, "| new |\n|---|\n| 3 |") == new  # idempotent
    with pytest.raises(report.MarkerError, match="exactly one"):
        report.replace_block(README.replace("<!-- bench:end -->", ""), "x")
    with pytest.raises(report.MarkerError, match="exactly one"):
        report.replace_block(README + "<!-- bench:begin -->\n", "x")
    with pytest.raises(report.MarkerError, match="before"):
        report.replace_block("<!-- bench:end -->\n<!-- bench:begin -->\n", "x")


def test_readme_command_copies_results_md(tmp_path: Path) -> None:
    scripts = fake_bench(tmp_path / "bench", ok=ok_script())
    out = tmp_path / "out"
    readme = tmp_path / "README.md"
    readme.write_text(README)
    proc = run_bench("--readme", readme, "--out", out)
    assert proc.returncode == 2 and "run `make bench` first" in proc.stderr
    assert run_bench("--scripts", scripts, "--out", out).returncode == 0

    proc = run_bench("--readme", readme, "--out", out)
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text()
    block = text.split("<!-- bench:begin -->\n")[1].split("<!-- bench:end -->")[0]
    assert block == (out / "results.md").read_text()
    assert "| old | table |" not in text and text.endswith("More text | with a pipe.\n\n## Tests\n")

    readme.write_text("# no markers here\n")
    proc = run_bench("--readme", readme, "--out", out)
    assert proc.returncode == 2 and "<!-- bench:begin -->" in proc.stderr
    assert readme.read_text() == "# no markers here\n"

    results = json.loads((out / "results.json").read_text())
    (out / "results.json").write_text(json.dumps(results | {"quick": True}))
    readme.write_text(README)
    proc = run_bench("--readme", readme, "--out", out)
    assert proc.returncode == 2 and "--quick" in proc.stderr and readme.read_text() == README


def test_project_readme_has_one_generated_benchmark_block() -> None:
    text = (REPO / "README.md").read_text()
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    assert text.index("## Benchmarks") < text.index(report.BEGIN) < text.index(report.END)


BENCH_SCRIPTS = sorted(p.stem for p in (REPO / "bench").glob("*.py") if not p.stem.startswith("_"))


def test_bench_scripts_are_found() -> None:
    assert {"sparse_conv", "vae_scaling", "data_pipeline", "engine_overhead"} <= set(BENCH_SCRIPTS)


@pytest.mark.parametrize("name", BENCH_SCRIPTS)
def test_bench_script_takes_json_argument(name: str) -> None:
    """The runner passes `--json PATH` to every script: each one's argparse must know it."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / f"{name}.py"), "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--json" in proc.stdout
