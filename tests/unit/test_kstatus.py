"""The TrainingJob conditions as kstatus reads them (docs/CONTRACTS.md, "Conditions and kstatus").

Statuses come from the real decision core (core.decide on observations); the verdict comes from
the real library: sigs.k8s.io/cli-utils' status.Compute, built from its Go module as the
`kstatus` wrapper (hack/build/kstatus) by `hack/build-binaries.sh tools` (cached; about 40 s
cold), which needs no control plane."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from jobkit import (
    JOB,
    at,
    exited_pod,
    make_spec,
    running_job,
    running_pod,
    spec_dict,
    starting_pod,
    step,
)

from finetune_operator.api.models import TrainingJobStatus
from finetune_operator.api.parsing import status_to_dict
from finetune_testbed.cluster import REPO


@pytest.fixture(scope="module")
def kstatus() -> str:
    out = subprocess.run(["bash", str(REPO / "hack" / "build-binaries.sh"), "tools"], check=True,
                         stdout=subprocess.PIPE, text=True, timeout=3600).stdout
    path = Path(out.strip().splitlines()[-1]) / "kstatus"
    assert path.is_file(), f"hack/build-binaries.sh tools did not build {path}"
    return str(path)


def verdict(kstatus: str, status: TrainingJobStatus, generation: int = 1, **spec: Any) -> dict[str, str]:
    """kstatus's {status, message} for the job as the API would store it."""
    job = {"apiVersion": "finetune.dev/v1alpha1", "kind": "TrainingJob",
           "metadata": {"name": JOB, "namespace": "team-a", "generation": generation},
           "spec": spec_dict(**spec), "status": status_to_dict(status)}
    out = subprocess.run([kstatus], input=json.dumps(job), capture_output=True, text=True, timeout=30,
                         check=True)
    return json.loads(out.stdout)


def _queued() -> TrainingJobStatus:
    return step(None).status


def _starting() -> TrainingJobStatus:
    return step(_queued(), [starting_pod(1)], now=at(5)).status


def _resuming() -> TrainingJobStatus:
    return step(running_job(), [running_pod(1, deleting=True)], now=at(30)).status


def _succeeded() -> TrainingJobStatus:
    return step(running_job(), [exited_pod(1, 0)], now=at(30)).status


def _failed() -> TrainingJobStatus:
    spec = make_spec(runPolicy={"backoffLimit": 0})
    return step(running_job(spec), [exited_pod(1, 3)], now=at(30), spec=spec).status


def _suspended() -> TrainingJobStatus:
    return step(running_job(), [], now=at(30), spec=make_spec(suspend=True)).status


# (phase the decision core must produce, builder, spec overrides, kstatus's verdict)
CASES = [
    ("Queued", _queued, {}, "InProgress"),
    ("Starting", _starting, {}, "InProgress"),
    ("Resuming", _resuming, {}, "InProgress"),
    ("Running", running_job, {}, "Current"),
    ("Suspended", _suspended, {"suspend": True}, "Current"),
    ("Succeeded", _succeeded, {}, "Current"),
    ("Failed", _failed, {"runPolicy": {"backoffLimit": 0}}, "Failed"),
]


@pytest.mark.parametrize("phase, build, spec, expected", CASES, ids=[c[0] for c in CASES])
def test_each_phase_reads_as_documented(kstatus, phase, build, spec, expected):
    status = build()
    assert status.phase == phase
    result = verdict(kstatus, status, **spec)
    assert result["status"] == expected, result


def test_failed_verdict_carries_the_jobs_message(kstatus):
    status = _failed()
    assert verdict(kstatus, status, runPolicy={"backoffLimit": 0})["message"] == status.message


def test_suspending_is_in_progress_until_the_pods_are_gone(kstatus):
    spec = make_spec(suspend=True)
    status = step(running_job(), [running_pod(1)], now=at(30), spec=spec).status
    assert status.phase == "Running"  # the pod is still stopping
    assert verdict(kstatus, status, suspend=True)["status"] == "InProgress"


def test_an_unobserved_generation_is_in_progress_even_when_succeeded(kstatus):
    result = verdict(kstatus, _succeeded(), generation=2)
    assert result["status"] == "InProgress" and "generation" in result["message"], result
