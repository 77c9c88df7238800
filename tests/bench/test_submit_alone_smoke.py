"""Keeps `python -m bench.submit_alone` working: 10 owners of each kind are submitted and
each kind prints its line; whether they exist is checked by the creates themselves (each
create raises on an API error). Speed is not judged here; bench/README.md has the figures."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from finetune_testbed.cluster import REPO

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_submit_alone_prints_a_time_per_kind():
    sys.path.insert(0, str(REPO))
    from bench.submit_alone import KINDS

    res = subprocess.run([sys.executable, "-m", "bench.submit_alone", "--jobs", "10"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"bench.submit_alone failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    lines = [line for line in res.stdout.splitlines() if " submitted in " in line]
    assert [line.split(":")[0] for line in lines] == list(KINDS)
    assert all(re.fullmatch(r".*: 10 submitted in \d+\.\ds", line) for line in lines), lines
