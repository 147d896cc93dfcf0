"""Every quality suite of configs/quality/ runs, shrunk to a few steps, through `python -m quality --shrink`: the
configs validate, the pipeline trains, and the report holds every metric a target names (the numbers are the full
run's business: `make quality`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from testservers import REPO

pytestmark = pytest.mark.slow


def test_every_quality_suite_runs_shrunk() -> None:
    import yaml

    suites = yaml.safe_load((REPO / "configs/quality/targets.yaml").read_text())
    proc = subprocess.run([sys.executable, "-m", "quality", "--shrink"], cwd=REPO, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name, suite in suites.items():
        result = json.loads((REPO / f".interiorfusion/quality/{name}-shrunk.json").read_text())
        assert result["shrunk"] and "error" not in result
        reached = {t["metric"] for t in result["targets"] if t["value"] is not None}
        assert reached == {t["metric"] for t in suite["targets"]}


def test_unknown_suite_is_one_sentence() -> None:
    proc = subprocess.run([sys.executable, "-m", "quality", "nope"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("unknown quality suite 'nope'")
