"""Assemble an Observation from the TrainingJob manifest and its pods. Pure: parses, never fetches.

This is the only way the operator turns API objects into an Observation (reconcile_step.py calls it),
so which pods count (pod_facts.counts_for) and how the spec is read are decided here once."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from ..api.parsing import SpecError, parse_spec, parse_status
from .observation import Observation, PodObservation, ProgressSample, node_map
from .pod_facts import observe_pods

UnreadyNodes = Mapping[str, datetime | None]
# Unready nodes as a mapping (NotReady since when; None: the Node is gone), as names (lost now),
# or asked of the caller for the nodes of the pods that count: only the core knows which those are.
NodeFacts = UnreadyNodes | Iterable[str] | Callable[[tuple[PodObservation, ...]], UnreadyNodes]


def observe_job(
    job: Mapping[str, Any],
    pods: Iterable[Mapping[str, Any]],
    *,
    now: datetime,
    progress: ProgressSample | None = None,
    unready_nodes: NodeFacts = (),
    node_lost_after_seconds: float = 0.0,
    allow_privileged: bool = False,
    create_error: tuple[str, str] | None = None,
) -> Observation:
    """Everything decide() needs, from the job body (as kopf or the API returns it) and the pod
    bodies indexed under its name (those of another owner are skipped here)."""
    metadata = job.get("metadata") or {}
    try:
        spec, spec_error = parse_spec(job.get("spec")), None
    except SpecError as exc:
        spec, spec_error = None, exc.message
    uid = str(metadata.get("uid") or "")
    counted = observe_pods(pods, uid)
    nodes = unready_nodes(counted) if callable(unready_nodes) else node_map(unready_nodes)
    generation = metadata.get("generation")
    return Observation(
        now=now,
        status=parse_status(job.get("status")),
        spec=spec,
        spec_error=spec_error,
        job_name=str(metadata.get("name", "")),
        namespace=str(metadata.get("namespace", "")),
        uid=uid,
        generation=generation if isinstance(generation, int) else None,
        pods=counted,
        unready_nodes=nodes,
        node_lost_after_seconds=node_lost_after_seconds,
        progress=progress,
        allow_privileged=allow_privileged,
        create_error=create_error,
    )
