"""Assemble an Observation from the TrainingJob manifest and its pods. Pure: parses, never fetches."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from ..api.parsing import SpecError, parse_spec, parse_status
from .observation import Observation, ProgressSample
from .pod_facts import observe_pods, parse_time


def observe_job(
    job: Mapping[str, Any],
    pods: Iterable[Mapping[str, Any]],
    *,
    now: datetime,
    progress: ProgressSample | None = None,
    unready_nodes: Mapping[str, datetime | None] | Iterable[str] = (),
    node_lost_after_seconds: float = 0.0,
    allow_privileged: bool = False,
) -> Observation:
    """Everything decide() needs, from the job body (as kopf or the API returns it) and pod bodies."""
    metadata = job.get("metadata") or {}
    try:
        spec, spec_error = parse_spec(job.get("spec")), None
    except SpecError as exc:
        spec, spec_error = None, exc.message
    generation = metadata.get("generation")
    return Observation(
        now=now,
        status=parse_status(job.get("status")),
        spec=spec,
        spec_error=spec_error,
        job_name=str(metadata.get("name", "")),
        namespace=str(metadata.get("namespace", "")),
        uid=str(metadata.get("uid", "")),
        generation=generation if isinstance(generation, int) else None,
        pods=observe_pods(pods, metadata.get("uid")),
        unready_nodes=unready_nodes if isinstance(unready_nodes, Mapping) else list(unready_nodes),
        node_lost_after_seconds=node_lost_after_seconds,
        progress=progress,
        allow_privileged=allow_privileged,
        creation_time=parse_time(metadata.get("creationTimestamp")),
    )
