"""An independent watch client: the benchmark's stopwatch.

Two watches per side (the namespace's pods and the owners: TrainingJobs or Jobs), each in
its own thread. Every time is `time.monotonic()` when the watch delivered the event, so
"pod phase change -> owner status" is t_owner - t_pod as one outside observer sees it
(operations.md §1.6: t2 - t1). Both sides are measured by the same code."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .kubeapi import Api, ApiError


@dataclass
class PodRecord:
    owner: str | None
    added: float
    phase: str | None = None
    times: dict[str, float] = field(default_factory=dict)  # phase -> first time seen


@dataclass
class OwnerRecord:
    added: float
    state: str | None = None          # None | "running" | "complete" | "failed"
    times: dict[str, float] = field(default_factory=dict)  # state -> first time seen


# A TrainingJob's status.phase, and a pod's, -> the owner state it stands for.
_PHASE_STATE = {"Running": "running", "Succeeded": "complete", "Failed": "failed"}


def trainingjob_state(obj: dict) -> str | None:
    phase = (obj.get("status") or {}).get("phase")
    return _PHASE_STATE.get(phase) if phase is not None else None


def job_state(obj: dict) -> str | None:
    status = obj.get("status") or {}
    conds = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    if (status.get("succeeded") or 0) >= 1 or conds.get("Complete") == "True":
        return "complete"
    if (status.get("failed") or 0) >= 1 or conds.get("Failed") == "True":
        return "failed"
    if (status.get("ready") or 0) >= 1:
        return "running"
    return None


class _Stream(threading.Thread):
    def __init__(self, api: Api, path: str, on_event: Callable[[str, dict, float], None],
                 stop: threading.Event):
        super().__init__(daemon=True, name=f"watch {path}")
        self.api, self.path, self.on_event, self.stop = api, path, on_event, stop
        self.synced = threading.Event()
        self.errors = 0

    def run(self) -> None:
        session = self.api._new_session(1)
        rv = None
        while not self.stop.is_set():
            try:
                if rv is None:
                    listing = self.api.get(self.path)
                    now = time.monotonic()
                    for item in listing.get("items") or []:
                        self.on_event("ADDED", item, now)
                    rv = listing["metadata"]["resourceVersion"]
                    self.synced.set()
                for ev in self.api.watch(self.path, rv, 300, session=session):
                    now = time.monotonic()
                    obj = ev.get("object") or {}
                    if ev.get("type") == "ERROR":
                        rv = None  # 410 Gone: list again
                        break
                    rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                    if ev.get("type") != "BOOKMARK":
                        self.on_event(ev["type"], obj, now)
                    if self.stop.is_set():
                        return
            except (ApiError, OSError, ValueError, KeyError) as exc:
                self.errors += 1
                if isinstance(exc, ApiError) and exc.status == 410:
                    rv = None
                time.sleep(0.5)
            except Exception:
                self.errors += 1
                time.sleep(0.5)


class Watcher:
    def __init__(self, api: Api, namespace: str, owner_path: str,
                 owner_state: Callable[[dict], str | None], pod_owner_label: str):
        self.lock = threading.Lock()
        self.pods: dict[str, PodRecord] = {}
        self.owners: dict[str, OwnerRecord] = {}
        self._owner_state, self._label = owner_state, pod_owner_label
        self._stop = threading.Event()
        self.streams = [
            _Stream(api, f"/api/v1/namespaces/{namespace}/pods", self._pod_event, self._stop),
            _Stream(api, owner_path, self._owner_event, self._stop),
        ]

    def start(self, timeout: float = 30) -> Watcher:
        for s in self.streams:
            s.start()
        for s in self.streams:
            if not s.synced.wait(timeout):
                raise TimeoutError(f"watch {s.path} did not sync")
        return self

    def stop(self) -> None:
        self._stop.set()

    def _pod_event(self, type_: str, pod: dict, now: float) -> None:
        meta = pod.get("metadata") or {}
        name = meta.get("name")
        if type_ == "DELETED" or not name:
            return
        phase = (pod.get("status") or {}).get("phase")
        with self.lock:
            rec = self.pods.get(name)
            if rec is None:
                rec = self.pods[name] = PodRecord((meta.get("labels") or {}).get(self._label), now)
            if phase != rec.phase:
                rec.phase = phase
                if phase is not None:
                    rec.times.setdefault(phase, now)

    def _owner_event(self, type_: str, obj: dict, now: float) -> None:
        name = (obj.get("metadata") or {}).get("name")
        if type_ == "DELETED" or not name:
            return
        state = self._owner_state(obj)
        with self.lock:
            rec = self.owners.get(name)
            if rec is None:
                rec = self.owners[name] = OwnerRecord(now)
            if state != rec.state:
                rec.state = state
                if state:
                    rec.times.setdefault(state, now)

    # ---- queries (all under the lock) -----------------------------------------------
    def count_pods(self, phase: str | None = None) -> int:
        with self.lock:
            if phase is None:
                return len(self.pods)
            return sum(1 for p in self.pods.values() if p.phase == phase)

    def count_owners(self, state: str) -> int:
        with self.lock:
            return sum(1 for o in self.owners.values() if o.state == state)

    def pod_of(self) -> dict[str, str]:
        """owner -> its (latest seen) pod name."""
        with self.lock:
            return {p.owner: name for name, p in self.pods.items() if p.owner}

    def inconsistent(self) -> int:
        """Owners whose status does not (yet) say what their pod says: pod Running ->
        owner running, pod Succeeded -> owner complete. Owners without a pod count too."""
        with self.lock:
            by_owner = {p.owner: p for p in self.pods.values() if p.owner}
            bad = 0
            for name, owner in self.owners.items():
                pod = by_owner.get(name)
                want = _PHASE_STATE.get(pod.phase) if pod and pod.phase is not None else None
                if want is None or owner.state != want:
                    bad += 1
            return bad

    def added_times(self, kind: str) -> list[float]:
        with self.lock:
            recs = self.pods if kind == "pod" else self.owners
            return [r.added for r in recs.values()]

    def first_time(self, kind: str, state: str) -> list[float]:
        with self.lock:
            recs = self.pods if kind == "pod" else self.owners
            return [r.times[state] for r in recs.values() if state in r.times]

    def lags(self, pod_phase: str, owner_state: str, owners: set[str] | None = None) -> list[float]:
        """Per owner: first time the owner showed `owner_state` minus first time its pod
        showed `pod_phase` (only owners with both, optionally restricted to `owners`)."""
        out = []
        with self.lock:
            by_owner = {p.owner: p for p in self.pods.values() if p.owner}
            for name, owner in self.owners.items():
                if owners is not None and name not in owners:
                    continue
                pod = by_owner.get(name)
                if pod and pod_phase in pod.times and owner_state in owner.times:
                    out.append(owner.times[owner_state] - pod.times[pod_phase])
        return out
