"""Watching the world: list+watch caches of the chaos namespace's pods and TrainingJobs.
Both also keep a history (each pod's life, each attempt's conclusion) on one monotonic
clock, since a snapshot taken later would miss a short overlap of two attempts or a rank
left running for a while (invariants.attempt_overlaps, invariants.lingering_gang_problems)."""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from pathlib import Path

from ..kuberaw import ApiError, Kube
from .common import GROUP_PATH, MANAGED_PODS, attempt_of, disrupted_pod, exit_code_of, job_of, pod_live
from .invariants import CONCLUDED_PHASES, PodSpan

STATUS_KEYS = ("phase", "reason", "attempt", "failures", "resumes")


class Tracker(threading.Thread):
    """List+watch of one resource in the namespace, kept as a dict by name; reconnects (and
    re-lists) when the stream ends or the API server goes away."""

    def __init__(self, kubeconfig: Path, path: str, query: dict | None = None):
        super().__init__(daemon=True)
        self.kube = Kube(kubeconfig)
        self.path, self.query = path, dict(query or {})
        self.items: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.synced = threading.Event()
        self.reconnects = 0

    def on_change(self, name: str, old: dict | None, new: dict | None) -> None:
        pass

    def on_relist(self) -> None:
        pass

    def snapshot(self) -> dict[str, dict]:
        with self.lock:
            return dict(self.items)

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                rv = self._relist()
                self.synced.set()
                while not self.stopping.is_set():
                    next_rv = self._watch(rv)
                    if next_rv is None:
                        return
                    rv = next_rv
            except Exception:  # API server restarts end streams; re-list
                self.reconnects += 1
                self.stopping.wait(1.0)

    def _relist(self) -> str:
        """Replaces the cache with a fresh list, reporting every difference; returns its
        resourceVersion."""
        listing = self.kube.get(self.path, query={**self.query, "limit": None})
        rv = listing["metadata"]["resourceVersion"]
        with self.lock:
            old = self.items
            self.items = {o["metadata"]["name"]: o for o in listing.get("items", [])}
            # what ended in the gap first, what is new last: a history never shows a pod
            # born in the gap as overlapping one that died in it
            for name in sorted(set(old) | set(self.items), key=lambda n: (n in self.items, n not in old)):
                if old.get(name) is not self.items.get(name):
                    self.on_change(name, old.get(name), self.items.get(name))
            self.on_relist()
        return rv

    def _watch(self, rv: str) -> str | None:
        """One watch stream from rv; returns the last resourceVersion seen, or None when
        stopped."""
        for ev in self.kube.watch(self.path, {**self.query, "resourceVersion": rv,
                                              "allowWatchBookmarks": "true",
                                              "timeoutSeconds": 30}, timeout=45):
            kind, obj = ev.get("type"), ev.get("object") or {}
            if kind == "ERROR":
                raise ApiError(int(obj.get("code") or 0), obj.get("message", "watch error"))
            rv = obj.get("metadata", {}).get("resourceVersion", rv)
            if kind == "BOOKMARK":
                continue
            name = obj["metadata"]["name"]
            with self.lock:
                old = self.items.get(name)
                if kind == "DELETED":
                    self.items.pop(name, None)
                    self.on_change(name, old, None)
                else:
                    self.items[name] = obj
                    self.on_change(name, old, obj)
            if self.stopping.is_set():
                return None
        return rv

    def stop(self) -> None:
        self.stopping.set()


class PodTracker(Tracker):
    """Pods of the operator; keeps each pod's life as a PodSpan (by uid) and remembers how
    each pod ended (a pod that really exited non-zero)."""

    def __init__(self, kubeconfig: Path, namespace: str):
        super().__init__(kubeconfig, f"/api/v1/namespaces/{namespace}/pods",
                         {"labelSelector": MANAGED_PODS})
        self.spans: dict[str, PodSpan] = {}
        self.seen: set[str] = set()
        self.nonzero_exits: dict[str | None, set[int]] = defaultdict(set)  # job -> attempts
        self.t0 = time.monotonic()

    def _record(self, old: dict | None, new: dict | None) -> None:
        pod = new or old or {}
        meta = pod.get("metadata") or {}
        job, uid, now = job_of(pod), meta.get("uid"), time.monotonic() - self.t0
        if not job or not uid:
            return
        span = self.spans.get(uid)
        if span is None:
            if new is None or not pod_live(new):
                return  # first seen already ended: it was never live in our history
            span = self.spans[uid] = PodSpan(job, attempt_of(pod), meta["name"], now)
        if new is not None and new["metadata"].get("deletionTimestamp") and span.stopping is None:
            span.stopping = now
        if (new is None or not pod_live(new)) and span.ended is None:
            span.ended = now

    def history(self) -> list[PodSpan]:
        with self.lock:
            return list(self.spans.values())

    def now(self) -> float:
        return time.monotonic() - self.t0

    def on_change(self, name: str, old: dict | None, new: dict | None) -> None:
        self.seen.add(name)
        self._record(old, new)
        if new is not None and not pod_live(new):
            code = exit_code_of(new)
            # 143 is SIGTERM: a stopped pod, not a trainer that failed
            if code not in (None, 0, 143) and not disrupted_pod(new) \
                    and not new["metadata"].get("deletionTimestamp"):
                self.nonzero_exits[job_of(new)].add(attempt_of(new))


class JobTracker(Tracker):
    """TrainingJobs; remembers when any job's status (phase, reason, counters) last changed."""

    def __init__(self, kubeconfig: Path, namespace: str, t0: float | None = None):
        super().__init__(kubeconfig, f"{GROUP_PATH}/namespaces/{namespace}/trainingjobs")
        self.last_change = time.monotonic()
        self.changes = 0
        self.t0 = time.monotonic() if t0 is None else t0  # the PodTracker's clock
        self.concluded: dict[tuple[str, int], float] = {}  # (job, attempt) -> first seen concluded
        self.timeline: defaultdict[str, list[tuple]] = defaultdict(list)  # job -> (t, phase, attempt, reason)

    def on_change(self, name: str, old: dict | None, new: dict | None) -> None:
        status = (new or {}).get("status") or {}
        if _status_key(old) != _status_key(new):
            self.last_change = time.monotonic()
            self.changes += 1
            self.timeline[name].append((round(self.last_change - self.t0, 2), status.get("phase"),
                                        status.get("attempt"), status.get("reason")))
        if status.get("phase") in CONCLUDED_PHASES and status.get("attempt"):
            self.concluded.setdefault((name, int(status["attempt"])), time.monotonic() - self.t0)

    def conclusions(self) -> dict[tuple[str, int], float]:
        with self.lock:
            return dict(self.concluded)


def _status_key(job: dict | None) -> tuple:
    return tuple(((job or {}).get("status") or {}).get(k) for k in STATUS_KEYS)
