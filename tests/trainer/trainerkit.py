"""Helpers for the trainer tests (subprocess runner, condition waits, metrics scrape)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

import finetune_contract as c

STEP_LINE = re.compile(r"step (\d+)/(\d+) loss=([-+0-9.eEnaif]+)")


def wait_until(predicate, timeout: float, what: str, proc: TrainerRun | None = None, interval: float = 0.02):
    """Poll ``predicate`` until truthy (returned) or fail after ``timeout`` seconds.

    When ``proc`` exits before the condition holds, fail at once with its output.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.popen.poll() is not None:
            value = predicate()
            if value:
                return value
            pytest.fail(f"trainer exited (rc={proc.popen.returncode}) before {what}:\n{proc.output()[-4000:]}")
        if time.monotonic() > deadline:
            tail = proc.output()[-4000:] if proc is not None else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{tail}")
        time.sleep(interval)


class TrainerRun:
    """``python -m finetune_trainer`` in a subprocess, output to a file."""

    def __init__(self, workdir: Path, env: dict[str, str], args: list[str] | None = None, name: str = "run"):
        self.workdir = Path(workdir)
        self.env = env
        self.log_path = self.workdir / f"{name}.log"
        self._fh = open(self.log_path, "wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "finetune_trainer", *(args or [])],
            env=env,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float = 120) -> int:
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"trainer did not exit within {timeout}s:\n{self.output()[-4000:]}")
        self._fh.close()
        return rc

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """The launcher's group and every descendant: torchrun starts its workers in
        sessions of their own, out of reach of the group kill."""
        if self.popen.poll() is None:
            try:
                for child in psutil.Process(self.popen.pid).children(recursive=True):
                    child.send_signal(sig)
            except psutil.Error:
                pass
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass

    def workers(self) -> list[psutil.Process]:
        """The launcher's child processes (torchrun workers), while it runs."""
        try:
            return psutil.Process(self.popen.pid).children(recursive=True)
        except psutil.Error:
            return []

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def losses(self) -> dict[int, str]:
        """step -> loss as printed (6 decimals) from the progress lines."""
        return {int(m.group(1)): m.group(3) for m in STEP_LINE.finditer(self.output())}

    def last_step(self) -> int:
        steps = self.losses()
        return max(steps) if steps else 0

    @property
    def out_dir(self) -> Path:
        return Path(self.env[c.ENV_OUTPUT_DIR])

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.env.get(c.ENV_CHECKPOINT_DIR) or self.out_dir / "checkpoints")

    def termination(self) -> dict:
        text = Path(self.env[c.ENV_TERMINATION_LOG]).read_text()
        assert len(text.encode()) < c.TERMINATION_MESSAGE_MAX_BYTES
        msg = c.parse_termination_message(text)
        assert msg is not None, f"not a termination message: {text!r}"
        assert set(json.loads(text)) == set(c.TERMINATION_MESSAGE_KEYS)
        assert "\n" not in msg["message"]
        return msg

    def metrics_port(self) -> int | None:
        p = self.ckpt_dir / c.WORK_SUBDIR / c.METRICS_PORT_FILE
        try:
            return int(p.read_text().strip())
        except (OSError, ValueError):
            return None

    def __del__(self):  # never leave a trainer behind
        try:
            self.kill()
            self._fh.close()
        except Exception:
            pass


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{c.METRICS_PATH}", timeout=5) as resp:
        text = resp.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        values[name] = float(value)
    return values


def make_env(tmp: Path, model: Path, data: Path, **ft: object) -> dict[str, str]:
    """Environment for one trainer run in ``tmp``; keyword args are FT_* names without prefix."""
    env = dict(os.environ)
    for k in list(env):
        if k.startswith("FT_") or k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            del env[k]
    env.update(
        {
            c.ENV_MODEL: str(model),
            c.ENV_DATASET: str(data),
            c.ENV_OUTPUT_DIR: str(tmp / "out"),
            c.ENV_TERMINATION_LOG: str(tmp / "termination-log"),
            c.ENV_METRICS_PORT: "0",
            c.ENV_METRICS_ADDR: "127.0.0.1",
            c.ENV_BATCH_SIZE: "4",
            c.ENV_SEQ_LEN: "48",
            c.ENV_SEED: "7",
            "PYTHONUNBUFFERED": "1",
        }
    )
    for k, v in ft.items():
        env[f"FT_{k.upper()}"] = str(v)
    return env
