"""A namespace's pod and TrainingJob events as one watch client sees them, each time-stamped on
arrival: latencies are measured from the test's own observations, never from sleeps."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .kuberaw import ApiError, Kube
from .procs import wait_for

TJ_API = "/apis/finetune.dev/v1alpha1"


def phase(name_phase: str, reason: str | None = None, attempt: int | None = None) -> Callable[[dict], bool]:
    """A predicate on a TrainingJob's status: this phase (and reason, attempt when given)."""
    def check(s: dict) -> bool:
        return (s.get("phase") == name_phase and (reason is None or s.get("reason") == reason)
                and (attempt is None or s.get("attempt") == attempt))
    return check


class Timeline:
    """Every pod ("pod") and TrainingJob ("tj") event of `namespace`, in arrival order
    (monotonic clock). Start it before acting; stop it when done."""

    def __init__(self, kubeconfig, namespace: str):
        self.kube = Kube(kubeconfig)
        self.paths = {"pod": f"/api/v1/namespaces/{namespace}/pods",
                      "tj": f"{TJ_API}/namespaces/{namespace}/trainingjobs"}
        self.events: list[tuple[float, str, dict]] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def start(self) -> Timeline:
        listed = [threading.Event() for _ in self.paths]
        for kind, done in zip(self.paths, listed, strict=True):
            threading.Thread(target=self._watch, args=(kind, done), daemon=True).start()
        for done in listed:
            assert done.wait(30), "Timeline: the watches did not start"
        return self

    def stop(self) -> None:
        self.stopping.set()

    def _list(self, kind: str) -> str:
        answer = self.kube.get(self.paths[kind])
        with self.lock:
            self.events += [(time.monotonic(), kind, obj) for obj in answer["items"]]
        return answer["metadata"]["resourceVersion"]

    def _watch(self, kind: str, listed: threading.Event) -> None:
        rv = self._list(kind)
        listed.set()
        while not self.stopping.is_set():
            try:
                for ev in self.kube.watch(self.paths[kind], {"resourceVersion": rv, "timeoutSeconds": 5,
                                                             "allowWatchBookmarks": "true"}, timeout=10):
                    obj = ev.get("object") or {}
                    if ev.get("type") == "ERROR":  # e.g. 410 Gone: list again below
                        raise ApiError(obj.get("code", 0), obj.get("message", "watch error"))
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    if ev.get("type") != "BOOKMARK":
                        with self.lock:
                            self.events.append((time.monotonic(), kind, obj))
                    if self.stopping.is_set():
                        return
            except ApiError:
                # A broken or expired watch: a fresh list records the current state (later
                # than it happened, never earlier) and the watch goes on from there.
                rv = self._list(kind)

    def seen(self, kind: str, name: str, pred: Callable[[dict], bool]) -> tuple[float, dict] | None:
        """(arrival, object) of the first event of `kind` `name` that met pred (given a pod, or a
        TrainingJob's status)."""
        with self.lock:
            return next(((t, o) for t, k, o in self.events if k == kind and o["metadata"]["name"] == name
                         and pred(o if kind == "pod" else o.get("status") or {})), None)

    def first(self, kind: str, name: str, pred: Callable[[dict], bool]) -> float | None:
        """When the first event of `kind` `name` met pred."""
        found = self.seen(kind, name, pred)
        return None if found is None else found[0]

    def wait(self, kind: str, name: str, pred: Callable[[dict], bool], what: str, timeout: float = 60) -> float:
        """first(...) once it happened; AssertionError naming `what` after `timeout` seconds."""
        try:
            seen = wait_for(lambda: self.first(kind, name, pred), timeout, what, interval=0.1)
        except TimeoutError as exc:
            raise AssertionError(str(exc)) from None
        assert seen is not None  # wait_for returns only a truthy value
        return seen
