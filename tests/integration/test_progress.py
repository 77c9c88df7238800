"""Progress and stalls: the operator reads the trainer's Prometheus endpoint (a small
fake server here, bound to the simulated pod's loopback IP) into status.progress."""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from finetune_testbed.jobs import job_manifest, sim
from finetune_testbed.procs import wait_for

pytestmark = pytest.mark.cluster


class FakeTrainer:
    """Serves finetune_trainer_* metrics on (ip, 9400); step/loss are set by the test."""

    def __init__(self, ip: str, port: int = 9400):
        self.step, self.total, self.loss = 0, 100, 3.0
        self.heartbeat = time.time()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = (f"finetune_trainer_step {fake.step}\n"
                        f"finetune_trainer_total_steps {fake.total}\n"
                        f"finetune_trainer_loss {fake.loss}\n"
                        f"finetune_trainer_tokens_per_second 1234.5\n"
                        f"finetune_trainer_heartbeat_timestamp_seconds {fake.heartbeat}\n").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((ip, port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def advance(self, step: int, loss: float) -> None:
        self.step, self.loss, self.heartbeat = step, loss, time.time()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def running_pod_ip(jobs, name: str, attempt: int = 1) -> str:
    def ip():
        for p in jobs.pods(name):
            if p["metadata"]["name"] == f"{name}-{attempt}":
                return p["status"].get("podIP")
        return None
    value = wait_for(ip, 30, "pod IP")
    assert value.startswith("127."), value  # kwok hands out loopback pod IPs (see cluster.py)
    return value


def scrapes(operator, result: str) -> float:
    for line in operator.metrics_text().splitlines():
        if line.startswith(f'finetune_operator_progress_scrapes_total{{result="{result}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_progress_shows_in_status_and_kubectl(jobs, cluster, namespace):
    jobs.apply(job_manifest("progressing", template=sim(outcome="run")))
    jobs.wait_phase("progressing", "Running", 60)
    fake = FakeTrainer(running_pod_ip(jobs, "progressing"))
    try:
        fake.advance(450, 1.25)
        fake.total = 1000
        status = jobs.wait("progressing",
                           lambda s: (s.get("progress") or {}).get("step") == 450, 30, "step 450")
        progress = status["progress"]
        assert progress["display"] == "450/1000" and progress["loss"] == pytest.approx(1.25)
        assert progress["tokensPerSecond"] == pytest.approx(1234.5)
        row = cluster.kubectl("get", "tj", "progressing", "-n", namespace).stdout.splitlines()[1]
        assert "450/1000" in row and "1.25" in row
    finally:
        fake.close()


def test_no_step_for_stall_timeout_resumes_from_checkpoint(jobs):
    jobs.apply(job_manifest("stuck", runPolicy={"stallTimeoutSeconds": 4},
                            template=sim(outcome="run")))
    jobs.wait_phase("stuck", "Running", 60)
    fake = FakeTrainer(running_pod_ip(jobs, "stuck"))
    try:
        fake.advance(10, 2.0)
        jobs.wait("stuck", lambda s: (s.get("progress") or {}).get("step") == 10, 30, "step 10")
        # The step never advances again: after stallTimeoutSeconds the attempt is replaced.
        status = jobs.wait("stuck", lambda s: s.get("attempt") == 2, 60, "attempt 2 after a stall")
        assert status["resumes"] == 1 and status["failures"] == 0
        assert status["lastInterruption"]["reason"] == "Stalled"
    finally:
        fake.close()


def test_unreachable_endpoint_alone_is_not_a_stall(jobs, live_operator):
    jobs.apply(job_manifest("quiet", runPolicy={"stallTimeoutSeconds": 2},
                            template=sim(outcome="run")))
    jobs.wait_phase("quiet", "Running", 60)
    deadline = time.monotonic() + 2
    before = scrapes(live_operator, "unreachable")
    # Wait for several failed reads after the stall timeout has passed.
    wait_for(lambda: time.monotonic() > deadline and
             scrapes(live_operator, "unreachable") >= before + 3, 60, "three failed reads")
    status = jobs.status("quiet")
    assert status["phase"] == "Running" and status["attempt"] == 1 and status["resumes"] == 0
