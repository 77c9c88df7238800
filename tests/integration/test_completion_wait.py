"""The README's way to wait for a job to end returns on failure as well as on success, and
kstatus (the real cli-utils library, hack/build/kstatus) reads finished jobs, as the API server
serves them after the real operator drove them on kwok, as Current and Failed."""
from __future__ import annotations

import json
import shlex
import subprocess
import time

import pytest

from finetune_testbed.cluster import REPO, build_binaries
from finetune_testbed.jobs import job_manifest, sim

pytestmark = pytest.mark.cluster

README = REPO / "README.md"
WAIT_TIMEOUT_S = 120


def readme_wait_commands(job: str, namespace: str) -> list[list[str]]:
    """The README's `kubectl wait` lines for `job`, the day-long timeout cut to the test's."""
    commands = []
    for line in README.read_text().splitlines():
        if not line.startswith("kubectl wait ") or "tj/llama-support-bot" not in line:
            continue
        args = shlex.split(line, comments=True)[1:]
        args = [a.replace("llama-support-bot", job) for a in args]
        args = [f"--timeout={WAIT_TIMEOUT_S}s" if a == "--timeout=24h" else a for a in args]
        commands.append([*args, "-n", namespace])
    assert len(commands) == 2, f"README: expected the wait and the success check, found {commands}"
    return commands


def kstatus_of(job: dict) -> dict:
    out = subprocess.run([str(build_binaries() / "kstatus")], input=json.dumps(job), capture_output=True,
                         text=True, timeout=30, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("name, outcome, phase, waited_rc, kstatus", [
    ("finishes", dict(outcome="succeed", run_for="2s"), "Succeeded", 0, "Current"),
    ("breaks", dict(outcome="fail", run_for="300ms", exit_code=3), "Failed", 1, "Failed"),
])
def test_readme_wait_returns_at_the_end_either_way(jobs, cluster, namespace, name, outcome, phase,
                                                     waited_rc, kstatus):
    wait_for_end, check_success = readme_wait_commands(name, namespace)
    jobs.apply(job_manifest(name, runPolicy={"backoffLimit": 0}, template=sim(**outcome)))
    started = time.monotonic()
    ended = cluster.kubectl(*wait_for_end, check=False, timeout=WAIT_TIMEOUT_S + 30)
    took = time.monotonic() - started
    assert ended.returncode == 0, ended.stderr
    assert took < WAIT_TIMEOUT_S / 2, f"kubectl wait took {took:.0f}s"
    job = jobs.get(name)
    assert job["status"]["phase"] == phase
    success = cluster.kubectl(*check_success, check=False)
    assert success.returncode == waited_rc, (success.stdout, success.stderr)
    assert kstatus_of(job)["status"] == kstatus
