"""Keeps `make bench` working: a tiny run (10 jobs per side on 2 kwok nodes) prints the
table with every row and writes the JSON record with finite numbers. Speed is not judged
here; the benchmark reports it (bench/README.md)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from finetune_testbed.cluster import REPO

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# Rows that are only defined for one side (the operator's own metric has no Job
# controller counterpart); every other row must have a finite number on both sides.
ONE_SIDED = {"api_own_total"}


def test_bench_tiny_run_prints_every_row(tmp_path):
    sys.path.insert(0, str(REPO))
    from bench.report import ROWS

    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, "-m", "bench.run", "--jobs", "10", "--extra-nodes", "0",
         "--rate", "20", "--timeout", "120", "--steady-seconds", "2",
         "--state-dir", str(tmp_path),
         "--json-out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"bench failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"

    table = res.stdout
    for label, _key, _fmt in ROWS:
        assert label in table, f"row {label!r} missing from the table:\n{table}"
    assert "cores=" in table and "N=10" in table

    record = json.loads(out.read_text())
    assert record["meta"]["jobs"] == 10
    rows = {r["key"]: r for r in record["table"]}
    assert set(rows) == {key for _label, key, _fmt in ROWS}
    for key, row in rows.items():
        sides = ("ours",) if key in ONE_SIDED else ("ours", "job_controller")
        for side in sides:
            value = row[side]
            assert isinstance(value, (int, float)) and math.isfinite(value), \
                f"{key} for {side} is not a finite number: {value!r}"
    for side in ("ours", "jobs"):
        r = record["results"][side]
        assert r["complete_lag_n"] > 0
        assert r["restart"]["changed_pods"] == 5
        assert r["watch_errors"] == 0
