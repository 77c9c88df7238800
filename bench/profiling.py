"""Sampling profile of the operator process with py-spy (dev extra), summarised.

py-spy runs --nonblocking (it does not stop the operator to read its stacks), writes
collapsed stacks ("raw" format: `frame;frame;frame count` per line) and the summary
below turns them into the top functions by own samples and by inclusive samples."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path


def py_spy_path() -> str | None:
    cand = Path(sys.prefix) / "bin" / "py-spy"
    return str(cand) if cand.exists() else shutil.which("py-spy")


class Profiler:
    def __init__(self, pid: int, out: Path, rate: int = 50):
        self.out = out
        exe = py_spy_path()
        if exe is None:
            raise RuntimeError("py-spy not installed (pip install py-spy==0.4.3; it is in the "
                               "dev extra: make venv)")
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
             "--nonblocking", "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def stop(self, timeout: float = 30) -> Path | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if not self.out.exists():
            sys.stderr.write(f"py-spy wrote no profile: {err.strip()[-500:]}\n")
            return None
        return self.out


def _short(frame: str) -> str:
    # "func (path/to/module.py:123)" -> "func (module.py)" with a package hint
    if " (" not in frame:
        return frame
    func, loc = frame.split(" (", 1)
    path = loc.rstrip(")").rsplit(":", 1)[0]
    parts = path.split(os.sep)
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1:]
    elif "finetune_operator" in parts:
        parts = parts[parts.index("finetune_operator"):]
    else:
        parts = parts[-2:]
    return f"{func} ({'/'.join(parts)})"


def summarize(path: Path, top: int = 15) -> dict:
    own: Counter = Counter()
    inclusive: Counter = Counter()
    packages: Counter = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";")]
        # the thread name (first frame, e.g. "process 123:\"python\"") is not a function
        frames = [f for f in frames if " (" in f]
        if not frames:
            continue
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
        leaf = frames[-1].split(" (", 1)[1].rstrip(")")
        packages[leaf.split("/", 1)[0] if "/" in leaf else leaf] += n

    # inclusive time of the operator's own functions, and of everything below the event
    # loop's plumbing (asyncio, runpy, __main__ are on every stack: not informative)
    generic = ("asyncio/", "<frozen runpy>", "__main__.py", "threading.py", "futures/thread.py")
    ours = Counter({k: v for k, v in inclusive.items() if "(finetune_operator/" in k
                    and "__main__.py" not in k})
    below = Counter({k: v for k, v in inclusive.items() if not any(g in k for g in generic)})

    def pct(c: Counter) -> list[tuple[str, float]]:
        return [(k, round(100.0 * v / total, 1)) for k, v in c.most_common(top)] if total else []

    return {"samples": total, "own": pct(own), "inclusive": pct(below),
            "inclusive_operator_code": pct(ours), "own_by_package": pct(packages)}


def format_summary(s: dict) -> str:
    lines = [f"profile: {s['samples']} samples"]
    for title, key in (("own time by package/module", "own_by_package"),
                       ("own time (leaf function)", "own"),
                       ("inclusive time (below the event loop)", "inclusive"),
                       ("inclusive time, operator code", "inclusive_operator_code")):
        lines.append(f"  {title}:")
        lines += [f"    {p:5.1f}%  {name}" for name, p in s.get(key, [])]
    return "\n".join(lines)
