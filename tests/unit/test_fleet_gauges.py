"""The scrape-time fleet gauges' per-job rows, as docs/CONTRACTS.md defines them."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

from jobkit import spec_dict

from finetune_operator.job_metrics import UNSET_STALL_ALERT_SECONDS, fleet_row

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def ts(seconds_ago: float) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def job(status: dict | None = None, stall: int | None = None, created_ago: float = 5000) -> dict:
    spec = spec_dict(runPolicy={"stallTimeoutSeconds": stall}) if stall else spec_dict()
    return {"metadata": {"creationTimestamp": ts(created_ago)}, "spec": spec, "status": status or {}}


def test_a_new_job_is_queued_since_its_creation():
    assert fleet_row(job(), NOW) == {"phase": "Queued", "queued_for": 5000.0}


def test_a_requeued_job_is_queued_since_its_attempt_started_not_since_creation():
    row = fleet_row(job({"phase": "Queued", "attemptStartTime": ts(30)}), NOW)
    assert row["queued_for"] == 30.0


def test_running_without_a_heartbeat_past_the_stall_timeout_is_stalled():
    assert fleet_row(job({"phase": "Running", "attemptStartTime": ts(100),
                          "progress": {"heartbeatTime": ts(61)}}, stall=60), NOW)["stalling"]
    assert not fleet_row(job({"phase": "Running", "attemptStartTime": ts(100),
                              "progress": {"heartbeatTime": ts(59)}}, stall=60), NOW)["stalling"]


def test_without_a_heartbeat_the_attempt_start_counts_and_the_default_limit_applies():
    long_ago = job({"phase": "Running", "attemptStartTime": ts(UNSET_STALL_ALERT_SECONDS + 1)})
    recent = job({"phase": "Running", "attemptStartTime": ts(UNSET_STALL_ALERT_SECONDS - 1)})
    assert fleet_row(long_ago, NOW)["stalling"] and not fleet_row(recent, NOW)["stalling"]


def test_a_spec_that_fails_validation_gets_the_contract_threshold():
    body = job({"phase": "Running", "attemptStartTime": ts(UNSET_STALL_ALERT_SECONDS + 1)}, stall=60)
    body["spec"]["hyperparameters"] = {}  # neither maxSteps nor epochs
    assert fleet_row(body, NOW)["stalling"]
    body["status"]["attemptStartTime"] = ts(UNSET_STALL_ALERT_SECONDS - 1)
    assert not fleet_row(body, NOW)["stalling"]


def test_finished_jobs_are_neither_queued_nor_stalled():
    assert fleet_row(job({"phase": "Succeeded", "attemptStartTime": ts(9999)}), NOW) == {"phase": "Succeeded"}


def test_the_reconcilers_rows_are_parsed_once_per_resource_version_and_follow_an_edit(monkeypatch):
    from finetune_operator import job_metrics, reconciler
    from finetune_operator.config import OperatorConfig

    monkeypatch.setattr(reconciler, "utcnow", lambda: NOW)
    r = reconciler.Reconciler(client=None, config=OperatorConfig())
    running = {"phase": "Running", "attemptStartTime": ts(1000)}
    body = job(running, stall=600)
    body["metadata"].update(namespace="ns", name="j", resourceVersion="7")
    r.jobs[("ns", "j")] = body
    parsed: list = []
    real = job_metrics.job_stall_seconds
    monkeypatch.setattr(reconciler, "job_stall_seconds", lambda j: parsed.append(1) or real(j))
    assert [row for _, row in r.fleet()] == [{"phase": "Running", "stalling": True}]
    assert [row for _, row in r.fleet()] == [{"phase": "Running", "stalling": True}]
    assert len(parsed) == 1  # the second scrape read the cached threshold
    # the stall timeout edited (runPolicy is editable): a new resourceVersion, parsed again
    edited = job(running, stall=3600)
    edited["metadata"].update(namespace="ns", name="j", resourceVersion="8")
    r.jobs[("ns", "j")] = edited
    assert [row for _, row in r.fleet()] == [{"phase": "Running", "stalling": False}]
    assert len(parsed) == 2


def test_a_finished_jobs_row_is_its_phase_and_its_parsed_status_is_let_go(monkeypatch):
    from finetune_operator import reconciler
    from finetune_operator.config import OperatorConfig

    monkeypatch.setattr(reconciler, "utcnow", lambda: NOW)
    r = reconciler.Reconciler(client=None, config=OperatorConfig())
    body = job({"phase": "Running", "attemptStartTime": ts(10)})
    body["metadata"].update(namespace="ns", name="j", resourceVersion="7")
    r.jobs[("ns", "j")] = body
    assert [row for _, row in r.fleet()] == [{"phase": "Running", "stalling": False}]
    assert r.state[("ns", "j")].parsed_status is not None  # kept for the next scrape
    done = job({"phase": "Failed", "attemptStartTime": ts(9999)})
    done["metadata"].update(namespace="ns", name="j", resourceVersion="9")
    r.jobs[("ns", "j")] = done
    rows = [row for _, row in r.fleet()]
    assert rows == [fleet_row(done, NOW)] == [{"phase": "Failed"}]
    assert r.state[("ns", "j")].parsed_status is None
