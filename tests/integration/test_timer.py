"""The fleet timer (finetune_operator/fleet_timer.py) on the local control plane: a finished
job is deleted after its TTL, and a trainer that stays silent is read less often without
hiding progress once it answers (finetune_operator/progress.py, scrape_due). The session
operator runs with the tests' fast intervals (progress every 2 s, FAST_ARGS)."""
from __future__ import annotations

import time

import pytest

from finetune_operator.progress import UNANSWERED_EVERY, UNANSWERED_TRIES
from finetune_testbed.jobs import job_manifest, sim
from finetune_testbed.operator_proc import FAST_ARGS
from finetune_testbed.procs import wait_for
from finetune_testbed.prometheus import FakeTrainer

pytestmark = pytest.mark.cluster
PROGRESS_INTERVAL = float(FAST_ARGS[FAST_ARGS.index("--progress-interval") + 1])


def running_pod_ip(jobs, name: str) -> str:
    def ip():
        return next((p["status"].get("podIP") for p in jobs.pods(name)
                     if p["metadata"]["name"] == f"{name}-1"), None)
    return wait_for(ip, 30, "pod IP")


def scrapes(operator, result: str) -> float:
    prefix = f'finetune_operator_progress_scrapes_total{{result="{result}"}}'
    return next((float(line.split()[-1]) for line in operator.metrics_text().splitlines()
                 if line.startswith(prefix)), 0.0)


def test_finished_job_is_deleted_after_its_ttl(jobs):
    jobs.apply(job_manifest("short-lived", runPolicy={"ttlSecondsAfterFinished": 3},
                            template=sim(outcome="succeed", run_for="1s")))
    status = jobs.wait_phase("short-lived", "Succeeded", 60)
    assert status.get("completionTime")
    wait_for(lambda: jobs.get("short-lived") is None, 60, "the job deleted after its TTL")


def test_silent_trainer_is_read_less_often_and_its_first_answer_still_shows(jobs, live_operator):
    jobs.apply(job_manifest("late-trainer", template=sim(outcome="run")))
    jobs.wait_phase("late-trainer", "Running", 60)
    ip = running_pod_ip(jobs, "late-trainer")
    start = scrapes(live_operator, "unreachable")
    # the first UNANSWERED_TRIES reads come one per tick
    wait_for(lambda: scrapes(live_operator, "unreachable") >= start + UNANSWERED_TRIES, 60,
             "the first failed reads")
    # then one tick in UNANSWERED_EVERY: over this window, per tick it would be about 6 reads
    window = 6 * PROGRESS_INTERVAL
    before, t0 = scrapes(live_operator, "unreachable"), time.monotonic()
    time.sleep(window)
    reads = scrapes(live_operator, "unreachable") - before
    assert reads <= window / (PROGRESS_INTERVAL * UNANSWERED_EVERY) + 1, \
        f"{reads:.0f} failed reads in {time.monotonic() - t0:.0f}s: the silent trainer was not backed off"
    fake = FakeTrainer(ip)
    try:
        fake.advance(7, 2.5)
        t_answer = time.monotonic()
        jobs.wait("late-trainer", lambda s: (s.get("progress") or {}).get("step") == 7, 60, "step 7")
        # seen within UNANSWERED_EVERY ticks, plus the status write and the watch
        assert time.monotonic() - t_answer <= (UNANSWERED_EVERY + 1) * PROGRESS_INTERVAL + 10
        # answered once: read on every tick again
        ok = scrapes(live_operator, "ok")
        wait_for(lambda: scrapes(live_operator, "ok") >= ok + 3, 4 * PROGRESS_INTERVAL + 10,
                 "a read on each tick once the trainer answered")
    finally:
        fake.close()
