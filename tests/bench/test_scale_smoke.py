"""Keeps `make bench-scale` working: a tiny cost curve (6 Running jobs, totals 6 and 12,
probes of 2) prints a column per point with every row filled and writes its JSON record.
Speed is not judged here; bench/README.md reports the real curve."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from finetune_testbed.cluster import REPO

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_scale_tiny_curve_fills_every_row(tmp_path):
    sys.path.insert(0, str(REPO))
    from bench.scale import ROWS

    out = tmp_path / "scale.json"
    res = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--active", "6", "--points", "6,12",
         "--probe", "2", "--extra-nodes", "1", "--fill-rate", "10", "--steady-seconds", "2",
         "--settle-seconds", "1", "--timeout", "120", "--json-out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"bench.scale failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"

    header, _rule, *body = res.stdout.strip().split("\n\n")[0].splitlines()
    assert header == "| | 6 (6) | 12 (6) |", header
    assert [line[2:].split(" | ")[0] for line in body] == [label for label, _k, _f in ROWS[1:]]

    points = json.loads(out.read_text())["points"]
    assert [p["total"] for p in points] == [6, 12]
    assert points[0]["fill_jobs"] == 0 and points[1]["fill_jobs"] == 12 - 6 - 2 - 2
    for p in points:
        for _label, key, _fmt in ROWS[1:]:
            if key.startswith("fill_") and key != "fill_jobs" and p["fill_jobs"] == 0:
                continue  # nothing was filled in at the first point
            value = p[key]
            assert isinstance(value, (int, float)) and math.isfinite(value), \
                f"{key} at {p['total']} jobs is not a finite number: {value!r}"
        assert p["restart_lists"] >= 1 and p["restart_watches"] >= 1, p["restart_api_detail"]
