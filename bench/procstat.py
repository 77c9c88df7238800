"""RSS and CPU seconds of named processes (psutil), across restarts.

Each name holds segments (one per pid). CPU of a segment is counted from `cpu_start`
(the process's CPU when tracking began: 0 for a process started inside the window, its
current CPU for one that was already running) to the last sample. Sampling twice a
second in a thread; `sample(name)` right before a SIGKILL keeps what would be lost."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psutil


@dataclass
class _Segment:
    proc: psutil.Process
    cpu_start: float
    cpu_last: float
    rss_last: int = 0


@dataclass
class _Tracked:
    segments: list[_Segment] = field(default_factory=list)
    rss_peak: int = 0
    conns_last: int = 0
    conns_peak: int = 0


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system  # the process itself (children are not ours to count)


class ProcSampler:
    def __init__(self, interval: float = 0.5, api_port: int | None = None):
        self.interval = interval
        self.api_port = api_port  # count each process's TCP connections to this port
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="procstat")

    def start(self) -> ProcSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def track(self, name: str, pid: int, *, from_zero: bool) -> None:
        """Start (or continue, for a restarted process) counting `name` at `pid`."""
        p = psutil.Process(pid)
        cpu = _cpu(p)
        with self._lock:
            t = self._tracked.setdefault(name, _Tracked())
            t.segments.append(_Segment(p, 0.0 if from_zero else cpu, cpu))
        self.sample(name)

    def reset(self, name: str) -> None:
        with self._lock:
            self._tracked.pop(name, None)

    def sample(self, name: str | None = None) -> None:
        with self._lock:
            items = [(n, t) for n, t in self._tracked.items() if name is None or n == name]
            for _n, t in items:
                for seg in t.segments:
                    try:
                        with seg.proc.oneshot():
                            seg.cpu_last = _cpu(seg.proc)
                            seg.rss_last = seg.proc.memory_info().rss
                    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                        continue
                    t.rss_peak = max(t.rss_peak, seg.rss_last)
                if self.api_port and t.segments:
                    try:
                        conns = sum(1 for c in t.segments[-1].proc.net_connections("tcp")
                                    if c.raddr and c.raddr.port == self.api_port)
                    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                        continue
                    t.conns_last, t.conns_peak = conns, max(t.conns_peak, conns)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def cpu_seconds(self, name: str) -> float:
        with self._lock:
            t = self._tracked.get(name)
            return sum(s.cpu_last - s.cpu_start for s in t.segments) if t else float("nan")

    def rss_peak_mib(self, name: str) -> float:
        with self._lock:
            t = self._tracked.get(name)
            return t.rss_peak / 2**20 if t else float("nan")

    def connections(self, name: str) -> tuple[int, int]:
        """(now, peak) TCP connections of `name` to the API server port."""
        with self._lock:
            t = self._tracked.get(name)
            return (t.conns_last, t.conns_peak) if t else (0, 0)

    def rss_now_mib(self, name: str) -> float:
        with self._lock:
            t = self._tracked.get(name)
            return t.segments[-1].rss_last / 2**20 if t and t.segments else float("nan")


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
