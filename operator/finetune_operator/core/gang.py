"""One attempt's pods as a gang (docs/CONTRACTS.md "Gangs"): all-or-nothing.

A single-node job is a gang of one. The attempt runs only when every rank runs; the first rank
to end decides how the whole attempt counts, once; rank 0 completing is the job completing
(it holds global rank 0, which writes the adapter).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal, cast

from ..api.models import TrainingJobSpec, TrainingJobStatus
from . import kueue
from .classify import Completed, Ended, InFlight, Outcome, classify_pod, node_lost_at
from .observation import Observation, PodObservation
from .timing import start_timeout_at

# The kubelet confirms a pod's end at its deletionTimestamp (the grace period's end); past
# this much more, nobody will (JobSet #576: a restart waiting forever on such a pod), so
# the pod is force-deleted like one on a lost node.
STUCK_TERMINATING_SECONDS = 60
STUCK_TERMINATING = "StuckTerminating"  # the DeletePod reason of such a forced deletion
# When a rank's trainer exits on its own while other ranks still run, the attempt ends only
# this long after that exit (or once every rank has ended): the kubelets report each pod on
# their own schedule, and the rank that failed first — or was evicted — must be the one that
# counts, not a peer whose collective failed a moment after it.
GANG_SETTLE_SECONDS = 5
_PHASE_ORDER = {"Queued": 0, "Starting": 1, "Running": 2}
InFlightPhase = Literal["Queued", "Starting", "Running"]
_SEVERITY = {"fatal": 0, "failure": 1, "interruption": 2}
# Endings the cluster caused (not the trainer): in a gang they explain the peers' errors.
# "Preempted" is not among them: without a DisruptionTarget condition it is only the trainer
# saying it got SIGTERM, which a failing peer's torchrun can cause too.
_EXTERNAL_REASONS = frozenset({"Evicted", "NodeLost", "NodeShutdown", "PodDeleted", "Disrupted"})


@dataclass(frozen=True)
class GangOutcome:
    outcome: Outcome
    pod: PodObservation | None = None  # the rank it is about (the cause, or rank 0)
    missing: tuple[int, ...] = ()  # ranks without a pod
    settle_until: datetime | None = None  # an ended rank waits for its peers' state until then


def gang(obs: Observation, attempt: int) -> dict[int, PodObservation]:
    """rank -> pod of this attempt; a replacement that is not being deleted wins over one that is."""
    oldest = datetime.min.replace(tzinfo=obs.now.tzinfo)
    out: dict[int, PodObservation] = {}
    for pod in obs.pods:
        if pod.attempt != attempt or not 0 <= pod.rank < obs.workers:
            continue
        best = out.get(pod.rank)
        if best is None or (not pod.deleting, pod.creation_time or oldest) > (
            not best.deleting,
            best.creation_time or oldest,
        ):
            out[pod.rank] = pod
    return out


def ready_ranks(obs: Observation, attempt: int) -> int:
    return sum(1 for pod in gang(obs, attempt).values() if pod.ready)


def stuck_since(pod: PodObservation) -> datetime | None:
    """When a terminating pod counts as stuck (None: not terminating)."""
    if not pod.deleting or pod.delete_by is None:
        return None
    return pod.delete_by + timedelta(seconds=STUCK_TERMINATING_SECONDS)


def is_stuck(pod: PodObservation, obs: Observation) -> bool:
    since = stuck_since(pod)
    return pod.live and since is not None and obs.now >= since


def _external(pod: PodObservation, ended: Ended) -> bool:
    """Ended by the cluster rather than by the trainer: a disruption, a deletion, a lost node.
    A SIGTERM the trainer reports without any of these may be its peers' doing."""
    signalled = (pod.deleting or pod.condition_true("DisruptionTarget") is not None or pod.pod_reason is not None
                 or pod.condition_true(kueue.TERMINATION_TARGET) is not None)
    return ended.kind == "interruption" and (ended.reason in _EXTERNAL_REASONS or signalled)


def _root_cause(ended: list[tuple[PodObservation, Ended]]) -> tuple[PodObservation, Ended]:
    """The rank whose end explains the others': a cluster-caused end first, else the earliest
    container exit (kubelets report seconds), on a tie the more severe kind, then a trainer
    killed by a signal (SIGKILL, OOM: it did not choose to exit; its peers' errors follow from
    its death), then the lower rank."""
    external = [(p, e) for p, e in ended if _external(p, e)]
    if external:
        return min(external, key=lambda pe: pe[0].rank)
    latest = datetime.max.replace(tzinfo=None)

    def key(pe: tuple[PodObservation, Ended]) -> tuple:
        term = pe[0].terminated
        finished = term.finished_at.replace(tzinfo=None) if term and term.finished_at else latest
        code = pe[1].exit_code
        return finished, _SEVERITY[pe[1].kind], not (code is not None and code > 128), pe[0].rank

    return min(ended, key=key)


def _settle_until(
    obs: Observation, ended: list[tuple[PodObservation, Ended]], running: list[PodObservation]
) -> datetime | None:
    """Until when to wait for the still-running ranks (None: conclude now). Not after a
    cluster-caused end, which explains itself; and a peer on a NotReady node is waited for
    until its node counts as lost, which would make that the cause."""
    if not running or any(_external(p, e) for p, e in ended):
        return None
    exits = [p.terminated.finished_at for p, _ in ended if p.terminated and p.terminated.finished_at]
    times = [min(exits) + timedelta(seconds=GANG_SETTLE_SECONDS)] if exits else []
    times += [t for t in (node_lost_at(p, obs) for p in running) if t is not None]
    return max(times, default=None)


def _labelled(obs: Observation, pod: PodObservation, text: str | None) -> str | None:
    if obs.workers == 1 or text is None:
        return text
    return f"rank {pod.rank}/{obs.workers}: {text}"


def classify_gang(obs: Observation, spec: TrainingJobSpec, status: TrainingJobStatus) -> GangOutcome:
    """How the current attempt stands, judged over all its ranks."""
    pods = gang(obs, status.attempt)
    # Progress is scraped from rank 0 only, so only rank 0 can be judged stalled.
    quiet = replace(obs, progress=None) if obs.workers > 1 else obs
    outcomes = {rank: classify_pod(pod, obs if rank == 0 else quiet, spec, status) for rank, pod in pods.items()}
    if isinstance(outcomes.get(0), Completed):
        return GangOutcome(outcomes[0], pods[0])
    ended = [(pods[r], o) for r, o in sorted(outcomes.items()) if isinstance(o, Ended)]
    if ended:
        pod, cause = _root_cause(ended)
        running = [p for r, p in pods.items() if p.live and not isinstance(outcomes[r], Ended)]
        until = _settle_until(obs, ended, running)
        if until is not None and obs.now < until and status.phase in _PHASE_ORDER:
            waiting = (f"rank {pod.rank} ended ({cause.reason}); waiting for the state of the other ranks "
                       "before ending the attempt")
            phase = cast(InFlightPhase, status.phase)
            return GangOutcome(InFlight(phase, status.reason, waiting), pod, settle_until=until)
        return GangOutcome(replace(cause, message=_labelled(obs, pod, cause.message) or cause.message), pod)
    missing = tuple(r for r in range(obs.workers) if r not in pods)
    if missing:
        return GangOutcome(_missing(obs, status, missing), None, missing)
    flights = {r: o for r, o in outcomes.items() if isinstance(o, InFlight)}
    if not flights:  # ranks other than 0 completed, rank 0 still finishing: wait for it
        return GangOutcome(InFlight("Running", None, f"attempt {status.attempt}: waiting for rank 0 to finish"))
    return _in_flight(obs, spec, status, pods, flights)


def _missing(obs: Observation, status: TrainingJobStatus, missing: tuple[int, ...]) -> Outcome:
    if status.phase == "Queued":  # written to status but not created yet: (re)create them
        return InFlight("Queued", status.reason, status.message)
    names = ", ".join(obs.pod_name(status.attempt, r) for r in missing)
    return Ended("interruption", "PodDeleted", f"pod {names} disappeared while the attempt was {status.phase}")


def _in_flight(
    obs: Observation,
    spec: TrainingJobSpec,
    status: TrainingJobStatus,
    pods: dict[int, PodObservation],
    flights: dict[int, InFlight],
) -> GangOutcome:
    rank, slowest = min(flights.items(), key=lambda ro: (_PHASE_ORDER[ro[1].phase], ro[0]))
    pod = pods[rank]
    if slowest.phase == "Queued":
        release_at = _release_at(obs, spec, status, pods)
        if release_at is not None and obs.now >= release_at:
            return GangOutcome(
                Ended(
                    "interruption",
                    "GangNotScheduled",
                    f"only {len(_placed(pods))} of {obs.workers} pods were placed within runPolicy.startTimeoutSeconds "
                    f"({spec.run_policy.start_timeout_seconds}s); releasing them to retry the whole gang. "
                    f"rank {rank}: {slowest.message}",
                ),
                pod,
            )
    if slowest.phase == "Running" and obs.workers > 1:
        nodes = sorted({p.node_name or "?" for p in pods.values()})
        message = f"attempt {status.attempt} is training on {obs.workers} pods (nodes {', '.join(nodes)})"
        return GangOutcome(InFlight("Running", None, message), pod)
    return GangOutcome(InFlight(slowest.phase, slowest.reason, _labelled(obs, pod, slowest.message)), pod)


def _placed(pods: dict[int, PodObservation]) -> list[PodObservation]:
    return [p for p in pods.values() if p.scheduled or p.node_name]


def _release_at(
    obs: Observation, spec: TrainingJobSpec, status: TrainingJobStatus, pods: dict[int, PodObservation]
) -> datetime | None:
    """When a gang that is only partly placed is released (None: not partly placed)."""
    placed = _placed(pods)
    if obs.workers == 1 or not placed or len(placed) == obs.workers:
        return None
    return start_timeout_at(spec, status, kueue.admitted_at(placed))


def partial_gang_deadline(obs: Observation, spec: TrainingJobSpec, status: TrainingJobStatus) -> datetime | None:
    """When the current attempt's gang, if only partly placed, will be released."""
    return _release_at(obs, spec, status, gang(obs, status.attempt))
