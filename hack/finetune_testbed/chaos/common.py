"""Names and small readers shared by the chaos modules: where the run lives, how to read a
pod the operator made, and the run's log line."""
from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Iterable

NAMESPACE = "chaos"
GROUP_PATH = "/apis/finetune.dev/v1alpha1"
MANAGED_PODS = "app.kubernetes.io/managed-by=finetune-operator"
POD_DONE = ("Succeeded", "Failed")


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pod_live(pod: dict) -> bool:
    return (pod.get("status") or {}).get("phase") not in POD_DONE


def job_of(pod: dict) -> str | None:
    return ((pod.get("metadata") or {}).get("labels") or {}).get("finetune.dev/job-name")


def attempt_of(pod: dict) -> int:
    try:
        return int(pod["metadata"]["labels"]["finetune.dev/attempt"])
    except (KeyError, TypeError, ValueError):
        return 0


def rank_of(pod: dict) -> int:
    """The pod's rank in its attempt's gang (a single-node job's pod has no rank label: 0)."""
    try:
        return int(pod["metadata"]["labels"].get("finetune.dev/rank", 0))
    except (KeyError, TypeError, ValueError, AttributeError):
        return 0


def exit_code_of(pod: dict) -> int | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            return term.get("exitCode")
    return None


def disrupted_pod(pod: dict) -> bool:
    status = pod.get("status") or {}
    return status.get("reason") == "Evicted" or any(
        c.get("type") == "DisruptionTarget" and c.get("status") == "True"
        for c in status.get("conditions") or [])


def pods_by_job(pods: Iterable[dict]) -> defaultdict[str | None, list[dict]]:
    by_job: defaultdict[str | None, list[dict]] = defaultdict(list)
    for p in pods:
        by_job[job_of(p)].append(p)
    return by_job
