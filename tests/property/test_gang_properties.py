"""Property tests for multi-node gangs: random sequences of rank states, clocks and deletions,
with each decision's actions applied to the simulated world (docs/CONTRACTS.md "Gangs").

Invariants after every decision, on top of test_decide_properties.check_decision:
- Running only when every rank of the attempt runs its trainer (all-or-nothing; a rank other
  than 0 may have completed while rank 0 finishes), except while a suspension stops them;
- once the attempt is concluded (Resuming, Failed, Succeeded, Suspended), every live pod of it
  is being deleted: no partial gang is left running;
- at most one count per attempt: failures + resumes never exceeds the attempts started;
- CreatePod only for ranks 0..workers-1 that have no pod yet, for the status' attempt.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st
from test_decide_properties import JOB, SETTINGS, T0, check_decision, pod_states, samples, specs

from finetune_operator.api import TrainingJobStatus
from finetune_operator.core import (
    CreatePod,
    CreateService,
    DeleteJob,
    DeletePod,
    Event,
    Observation,
    PodObservation,
    decide,
)

CONCLUDED = frozenset({"Resuming", "Failed", "Succeeded", "Suspended"})


@st.composite
def rank_states(draw: st.DrawFn, attempt: int, rank: int, now: datetime):
    pod = draw(pod_states(attempt, now))
    pod = dataclasses.replace(pod, name=f"{JOB}-{attempt}-{rank}", rank=rank, uid=f"{pod.uid}-{rank}")
    if pod.deleting:
        pod = dataclasses.replace(pod, delete_by=now + timedelta(seconds=draw(st.sampled_from([-400, -30, 0, 60]))))
    return pod


def check_gang(obs: Observation, d, workers: int) -> None:
    after = d.status
    current = [p for p in obs.pods if p.attempt == after.attempt and 0 <= p.rank < workers]
    # Every rank runs (or, rank 0 still finishing, has completed); a suspension keeps the phase
    # while it stops the pods.
    if after.phase == "Running" and not obs.spec.suspend:
        done = {p.rank for p in current if p.ready or (p.terminated and p.terminated.exit_code == 0)}
        assert done == set(range(workers)), f"Running with ready or completed ranks {sorted(done)} of {workers}"
    if after.phase in CONCLUDED:
        deleted = {a.name for a in d.deletes}
        left = [p.name for p in obs.pods if p.live and not p.deleting and p.name not in deleted]
        assert not left, f"{after.phase} leaves {left} running"
    assert after.failures + after.resumes <= after.attempt, "an attempt counted twice"
    have = {p.rank for p in current}
    for create in d.creates:
        assert create.attempt == after.attempt and 0 <= create.rank < workers and create.rank not in have


def apply_actions(pods: dict[tuple[int, int], PodObservation], actions, now: datetime) -> bool:
    for action in actions:
        if isinstance(action, CreatePod):
            key = (action.attempt, action.rank)
            if key not in pods:
                pods[key] = PodObservation(name=f"{JOB}-{action.attempt}-{action.rank}", attempt=action.attempt,
                                           rank=action.rank, uid=f"u{action.attempt}-{action.rank}",
                                           creation_time=now)
        elif isinstance(action, DeletePod):
            for key, pod in list(pods.items()):
                if pod.name != action.name:
                    continue
                if action.grace_seconds == 0:
                    del pods[key]
                else:
                    pods[key] = dataclasses.replace(pod, deleting=True, delete_by=now + timedelta(seconds=120))
        elif isinstance(action, DeleteJob):
            return True
        else:
            assert isinstance(action, (Event, CreateService))
    return False


@SETTINGS
@given(data=st.data())
def test_gang_sequences(data: st.DataObject) -> None:
    workers = data.draw(st.integers(2, 3))
    spec = data.draw(specs()).model_copy(update={"workers": workers})
    now = T0
    status = TrainingJobStatus()
    pods: dict[tuple[int, int], PodObservation] = {}
    for _ in range(data.draw(st.integers(1, 30))):
        now += timedelta(seconds=data.draw(st.sampled_from([0, 1, 5, 30, 120, 400])))
        for key in list(pods):
            change = data.draw(st.sampled_from(["keep", "keep", "keep", "state", "vanish"]))
            if change == "vanish":
                del pods[key]
            elif change == "state":
                pods[key] = data.draw(rank_states(key[0], key[1], now))
        if data.draw(st.integers(0, 9)) == 0:
            spec = spec.model_copy(update={"suspend": not spec.suspend})
        obs = Observation(now=now, status=status, spec=spec, job_name=JOB, generation=1,
                          pods=tuple(pods.values()), node_lost_after_seconds=30, progress=data.draw(samples))
        d = decide(obs)
        check_decision(obs, d)
        check_gang(obs, d, workers)
        status = d.status
        if apply_actions(pods, d.actions, now):
            break
