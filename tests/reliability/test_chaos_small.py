"""`make chaos` in small: 20 jobs (every third a 2-pod gang), 40 s of random faults (operator kills and pauses, pod
deletions and evictions, drains, node deletion and NotReady, exit-code failures, one API
server + etcd crash), then the invariants of finetune_testbed.chaos: zero violations.

Runs the real command line (`python -m finetune_testbed.chaos`) as a subprocess: it starts
a control plane of its own, so it shares nothing with the other tests. About 1.5 min.
The seed is random (printed in the table); FINETUNE_CHAOS_SEED=<n> replays a job mix and
fault sequence (timing still varies). On failure the logs are kept under the test's tmp_path."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_chaos_small_has_no_invariant_violations(tmp_path):
    out = tmp_path / "chaos.json"
    seed = os.environ.get("FINETUNE_CHAOS_SEED", "")
    cmd = [sys.executable, "-m", "finetune_testbed.chaos", "--jobs", "20", "--fault-seconds", "40",
           "--settle-seconds", "180", "--json", str(out), "--artifacts", str(tmp_path / "logs")] \
        + (["--seed", seed] if seed else [])
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    print(res.stdout)
    print(res.stderr[-3000:], file=sys.stderr)
    assert out.exists(), f"no report written (exit {res.returncode}):\n{res.stderr[-3000:]}"
    report = json.loads(out.read_text())
    # The run must have tested something: faults of most kinds, one control-plane restart.
    assert sum(report["faults"].values()) >= 10, report["faults"]
    assert report["faults"].get("apiserver_etcd_restart") == 1, report["faults"]
    assert len(report["faults"]) >= 5, report["faults"]
    assert sum(report["phases"].values()) == 20, report["phases"]
    # multi-node jobs too, and some of their attempts ended (judged for ranks left running)
    assert report["gang_jobs"] >= 5 and report["gang_attempts_concluded"] >= 1, \
        {k: report[k] for k in ("gang_jobs", "gang_attempts_concluded")}
    assert report["settled"], report["violations"]
    assert report["violations"] == [], "\n".join(report["violations"] + report["details"]) + \
        f"\n(seed {report['seed']}; logs in {tmp_path / 'logs'})"
    assert res.returncode == 0, res.stderr[-3000:]
