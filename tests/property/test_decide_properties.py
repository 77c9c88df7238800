"""Property tests for decide(): random policies, random pod states, random clocks.

Two generators: (1) one decision from an arbitrary previous status and arbitrary pods, and
(2) sequences where the world (pods, clock, suspend, nodes) changes at random between decisions
and the decisions' own actions are applied to it. Invariants checked after every decision:

- the phase is one of the seven; a terminal status never changes afterwards;
- counters never decrease, restarts == failures + resumes, at most one attempt counted per decision;
- CreatePod only for the status' attempt, one attempt per decision, never while another
  attempt's pod is live;
- deciding again on the new status is a fixpoint: same status, no Events, no new actions.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune_operator.api import PHASES, TERMINAL_PHASES, Interruption, TrainingJobStatus, parse_spec
from finetune_operator.core import (
    ContainerRunning,
    ContainerTerminated,
    ContainerWaiting,
    CreatePod,
    DeleteJob,
    DeletePod,
    Event,
    Observation,
    PodCondition,
    PodObservation,
    ProgressSample,
    decide,
)

JOB = "pj"
T0 = datetime(2025, 1, 1, tzinfo=UTC)
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies -------------------------------------------------------------------------------
exit_codes = st.sampled_from([0, 1, 2, 78, 137, 143])
reports = st.one_of(
    st.none(),
    st.builds(
        lambda outcome, step: {"outcome": outcome, "step": step, "checkpoint": f"/ck/{step}", "checkpointStep": step},
        st.sampled_from(["completed", "preempted", "config_error", "error"]),
        st.integers(0, 50),
    ),
)
rules = st.sampled_from(
    [
        {"action": "Resume", "onExitCodes": {"operator": "In", "values": [1]}},
        {"action": "Fail", "onExitCodes": {"operator": "In", "values": [2]}},
        {"action": "Count", "onExitCodes": {"operator": "NotIn", "values": [0, 143]}},
        {"action": "Fail", "onPodConditions": [{"type": "DisruptionTarget"}]},
        {"action": "Count", "onPodConditions": [{"type": "DisruptionTarget"}]},
    ]
)


@st.composite
def specs(draw: st.DrawFn) -> Any:
    backoff = draw(st.integers(0, 30))
    run_policy: dict[str, Any] = {
        "backoffLimit": draw(st.integers(0, 3)),
        "maxResumes": draw(st.integers(0, 3)),
        "autoResume": draw(st.sampled_from([True, True, True, False])),
        "startTimeoutSeconds": draw(st.integers(1, 300)),
        "backoffSeconds": backoff,
        "maxBackoffSeconds": backoff + draw(st.integers(0, 60)),
    }
    for key, values in (
        ("stallTimeoutSeconds", st.integers(1, 300)),
        ("activeDeadlineSeconds", st.integers(100, 20_000)),
        ("ttlSecondsAfterFinished", st.integers(0, 300)),
    ):
        if draw(st.booleans()):
            run_policy[key] = draw(values)
    raw: dict[str, Any] = {
        "image": "img",
        "model": "m",
        "dataset": {"path": "/d"},
        "hyperparameters": {"maxSteps": 50},
        "runPolicy": run_policy,
        "suspend": draw(st.booleans()) and draw(st.booleans()),  # suspended a quarter of the time
        "failurePolicy": {"rules": draw(st.lists(rules, max_size=3))},
    }
    if draw(st.integers(0, 19)) == 0:
        raw["template"] = {"hostNetwork": True}
    return parse_spec(raw)


@st.composite
def pod_states(draw: st.DrawFn, attempt: int, now: datetime) -> PodObservation:
    """Any state a trainer pod can be observed in."""
    kind = draw(
        st.sampled_from(["pending", "unschedulable", "starting", "start_error", "running", "running", "running",
                         "exited", "exited", "failed_no_container"])
    )
    node = draw(st.sampled_from(["n1", "n2"]))
    base: dict[str, Any] = dict(
        name=f"{JOB}-{attempt}", attempt=attempt, uid=f"u{attempt}-{draw(st.integers(0, 1))}",
        creation_time=now - timedelta(seconds=draw(st.integers(0, 600))),
    )
    if kind in ("pending", "unschedulable"):
        pod = PodObservation(
            phase="Pending", unschedulable_message="0/2 nodes" if kind == "unschedulable" else None, **base
        )
    elif kind in ("starting", "start_error"):
        reason = (
            "ContainerCreating"
            if kind == "starting"
            else draw(st.sampled_from(["ErrImagePull", "CreateContainerConfigError"]))
        )
        pod = PodObservation(
            phase="Pending", scheduled=True, node_name=node, container=ContainerWaiting(reason, "m"), **base
        )
    elif kind == "running":
        started = now - timedelta(seconds=draw(st.integers(0, 600)))
        pod = PodObservation(
            phase=draw(st.sampled_from(["Running", "Running", "Unknown"])),
            scheduled=True,
            node_name=node,
            container=ContainerRunning(started),
            **base,
        )
    elif kind == "exited":
        code = draw(exit_codes)
        reason = "OOMKilled" if code == 137 and draw(st.booleans()) else ("Completed" if code == 0 else "Error")
        pod = PodObservation(
            phase="Succeeded" if code == 0 else "Failed",
            scheduled=True,
            node_name=node,
            container=ContainerTerminated(code, reason, None, now),
            termination_message=draw(reports),
            **base,
        )
    else:
        pod = PodObservation(phase="Failed", scheduled=True, node_name=node, pod_reason="Evicted", **base)
    if draw(st.integers(0, 4)) == 0:
        pod = dataclasses.replace(pod, conditions=(PodCondition("DisruptionTarget", "True", "EvictionByEvictionAPI"),))
    if draw(st.integers(0, 4)) == 0:
        pod = dataclasses.replace(pod, deleting=True)
    return pod


samples = st.one_of(
    st.none(),
    st.builds(
        ProgressSample,
        step=st.integers(0, 50),
        total_steps=st.just(50),
        loss=st.one_of(st.none(), st.floats(0, 10), st.just(float("nan"))),
    ),
)


@st.composite
def statuses(draw: st.DrawFn, now: datetime) -> TrainingJobStatus:
    phase = draw(st.sampled_from([None, *PHASES]))
    attempt = 0 if phase is None else draw(st.integers(0 if phase == "Suspended" else 1, 4))
    failures, resumes = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    past = now - timedelta(seconds=draw(st.integers(0, 3000)))
    return TrainingJobStatus(
        phase=phase,
        reason=draw(st.sampled_from([None, "Evicted", "CreatingPod"])),
        attempt=attempt,
        failures=failures,
        resumes=resumes,
        restarts=failures + resumes,
        start_time=past if phase else None,
        attempt_start_time=past if phase else None,
        completion_time=past if phase in TERMINAL_PHASES else None,
        last_interruption=Interruption(reason="Evicted", attempt=attempt, time=past)
        if phase in ("Resuming", "Failed")
        else None,
    )


# --- invariants -------------------------------------------------------------------------------
def check_decision(obs: Observation, d) -> None:
    before, after = obs.status, d.status
    assert after.phase in PHASES
    if before.phase in TERMINAL_PHASES:
        assert after == before
        assert not d.creates and not d.events
    for counter in ("attempt", "failures", "resumes", "restarts"):
        assert getattr(after, counter) >= getattr(before, counter), counter
    assert after.restarts == after.failures + after.resumes
    assert (after.failures + after.resumes) - (before.failures + before.resumes) <= 1, "one attempt counted twice"
    # attempts move one at a time, except when a pod of a later attempt is adopted (then +1 at most)
    assert after.attempt <= max([before.attempt, *(p.attempt for p in obs.pods)]) + 1
    created = {c.attempt for c in d.creates}
    assert len(created) <= 1
    for attempt in created:
        assert attempt == after.attempt
        live_others = [p.name for p in obs.pods if p.live and p.attempt != attempt]
        assert not live_others, f"CreatePod({attempt}) while {live_others} live"
    for event in d.events:
        assert "\n" not in event.message and event.type in ("Normal", "Warning")
    if d.requeue_after is not None:
        assert d.requeue_after > 0

    again = decide(dataclasses.replace(obs, status=after))
    assert again.status == after, "decide is not a fixpoint on its own output"
    assert not again.events, f"duplicate events {again.events}"
    assert set(again.actions) <= set(d.actions), f"new actions {set(again.actions) - set(d.actions)}"


# --- property 1: any single observation ------------------------------------------------------
@SETTINGS
@given(data=st.data())
def test_any_observation(data: st.DataObject) -> None:
    now = T0 + timedelta(seconds=data.draw(st.integers(0, 10_000)))
    status = data.draw(statuses(now))
    attempts = st.integers(0, status.attempt + 2)
    pods = data.draw(st.lists(attempts.flatmap(lambda a: pod_states(a, now)), max_size=3))
    invalid = data.draw(st.integers(0, 19)) == 0
    obs = Observation(
        now=now,
        status=status,
        spec=None if invalid else data.draw(specs()),
        spec_error="spec.lora.r: too big" if invalid else None,
        job_name=JOB,
        generation=data.draw(st.integers(1, 3)),
        pods=tuple(pods),
        unready_nodes=data.draw(st.sampled_from([{}, {"n1": None}, {"n2": now - timedelta(seconds=30)}])),
        node_lost_after_seconds=60,
        progress=data.draw(samples),
        allow_privileged=data.draw(st.booleans()),
    )
    check_decision(obs, decide(obs))


# --- property 2: sequences against a changing world ------------------------------------------
def apply_actions(pods: dict[str, PodObservation], actions, now: datetime) -> bool:
    """Carry out a decision in the simulated world; True when the job was deleted."""
    for action in actions:
        if isinstance(action, CreatePod):
            name = f"{JOB}-{action.attempt}"
            if name not in pods:  # AlreadyExists: adopt
                pods[name] = PodObservation(
                    name=name, attempt=action.attempt, uid=f"u{action.attempt}", creation_time=now
                )
        elif isinstance(action, DeletePod) and action.name in pods:
            if action.grace_seconds == 0:
                del pods[action.name]
            else:
                pods[action.name] = dataclasses.replace(pods[action.name], deleting=True)
        elif isinstance(action, DeleteJob):
            return True
        else:
            assert isinstance(action, (Event, DeletePod))
    return False


@SETTINGS
@given(data=st.data())
def test_sequences(data: st.DataObject) -> None:
    spec = data.draw(specs())
    now = T0
    status = TrainingJobStatus()
    pods: dict[str, PodObservation] = {}
    unready: dict[str, datetime | None] = {}
    seen_terminal: TrainingJobStatus | None = None
    steps_after_terminal = 0
    for _ in range(data.draw(st.integers(1, 30))):
        now += timedelta(seconds=data.draw(st.sampled_from([0, 1, 5, 30, 120, 400])))
        for name in list(pods):
            change = data.draw(st.sampled_from(["keep", "keep", "state", "vanish"]))
            if change == "vanish":
                del pods[name]
            elif change == "state":
                pods[name] = data.draw(pod_states(pods[name].attempt, now))
        if data.draw(st.integers(0, 9)) == 0:  # a stray pod shows up (stale cache, manual pod)
            attempt = data.draw(st.integers(0, status.attempt + 1))
            pods[f"{JOB}-{attempt}"] = data.draw(pod_states(attempt, now))
        if data.draw(st.integers(0, 9)) == 0:
            spec = spec.model_copy(update={"suspend": not spec.suspend})
        if data.draw(st.integers(0, 7)) == 0:
            unready = data.draw(st.sampled_from([{}, {"n1": None}, {"n2": now}]))
        obs = Observation(
            now=now,
            status=status,
            spec=spec,
            job_name=JOB,
            generation=1,
            pods=tuple(pods.values()),
            unready_nodes=unready,
            node_lost_after_seconds=30,
            progress=data.draw(samples),
        )
        d = decide(obs)
        check_decision(obs, d)
        if seen_terminal is not None:
            assert d.status == seen_terminal
            steps_after_terminal += 1
            if steps_after_terminal > 2:
                break
        if d.status.phase in TERMINAL_PHASES:
            seen_terminal = d.status
        status = d.status
        if apply_actions(pods, d.actions, now):
            break
