"""Watching the world: list+watch caches of the chaos namespace's pods and TrainingJobs.
The pod cache checks 'never two live pods of one job' on every event, since a snapshot
taken later would miss a short overlap."""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from pathlib import Path

from ..kuberaw import ApiError, Kube
from .common import GROUP_PATH, MANAGED_PODS, attempt_of, disrupted_pod, exit_code_of, job_of, pod_live

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
            for name in set(old) | set(self.items):
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
    """Pods of the operator; checks 'never two live pods for one job' on every change and
    remembers how each pod ended (a pod that really exited non-zero)."""

    def __init__(self, kubeconfig: Path, namespace: str):
        super().__init__(kubeconfig, f"/api/v1/namespaces/{namespace}/pods",
                         {"labelSelector": MANAGED_PODS})
        self.overlaps: list[dict] = []
        self._overlap_keys: set = set()
        self.seen: set[str] = set()
        self.nonzero_exits: dict[str | None, set[int]] = defaultdict(set)  # job -> attempts
        self.t0 = time.monotonic()

    def _check_job(self, job: str | None) -> None:
        if not job:
            return
        live = sorted(n for n, p in self.items.items() if job_of(p) == job and pod_live(p))
        if len(live) > 1 and tuple(live) not in self._overlap_keys:
            self._overlap_keys.add(tuple(live))
            self.overlaps.append({"job": job, "pods": live,
                                  "t": round(time.monotonic() - self.t0, 1)})

    def on_change(self, name: str, old: dict | None, new: dict | None) -> None:
        pod = new or old or {}
        self.seen.add(name)
        if new is not None and not pod_live(new):
            code = exit_code_of(new)
            # 143 is SIGTERM: a stopped pod, not a trainer that failed
            if code not in (None, 0, 143) and not disrupted_pod(new) \
                    and not new["metadata"].get("deletionTimestamp"):
                self.nonzero_exits[job_of(new)].add(attempt_of(new))
        self._check_job(job_of(pod))

    def on_relist(self) -> None:
        for job in {job_of(p) for p in self.items.values()}:
            self._check_job(job)


class JobTracker(Tracker):
    """TrainingJobs; remembers when any job's status (phase, reason, counters) last changed."""

    def __init__(self, kubeconfig: Path, namespace: str):
        super().__init__(kubeconfig, f"{GROUP_PATH}/namespaces/{namespace}/trainingjobs")
        self.last_change = time.monotonic()
        self.changes = 0

    def on_change(self, name: str, old: dict | None, new: dict | None) -> None:
        if _status_key(old) != _status_key(new):
            self.last_change = time.monotonic()
            self.changes += 1


def _status_key(job: dict | None) -> tuple:
    return tuple(((job or {}).get("status") or {}).get(k) for k in STATUS_KEYS)
