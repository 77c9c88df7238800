"""Local node agent: a stand-in for kubelet, FOR DEVELOPMENT AND TESTS ONLY.

It is never part of deploy/. It registers a Node (default `local-0`, label
`finetune.dev/local-node=true`, no kwok annotation so kwok leaves it alone) with a fake
`nvidia.com/gpu` count, keeps its heartbeat (a Lease in kube-node-lease every ~10 s, the
Ready condition every ~20 s), and runs the pods bound to it as local processes:

    python -m finetune_testbed.localnode --kubeconfig K --node local-0 --gpus 2 --workdir DIR

or from Python (tests, demo):

    node = LocalNode(cluster.kubeconfig, node_name="local-0", gpus=2).start()  # waits for Ready
    node.create_pvc(ns, "ckpt")        # PV (hostPath = node.pvc_dir(ns, "ckpt")) pre-bound to a PVC
    node.log_path_for(ns, pod)         # the pod's stdout+stderr
    node.stop()                        # graceful node shutdown; node.kill() = crash
    node.delete_node()                 # Node, Lease and those PVs are cluster-scoped

What a pod becomes
------------------
* The FIRST container runs as a process: `command` + `args` (exec form, `$(VAR)` expanded as
  kubelet does). `python`/`python3` become the agent's interpreter (`sys.executable`, so the
  venv's packages are there); other bare names are looked up on PATH with the venv's bin/
  first. The image is ignored. Other containers are not run (reported Waiting with reason
  `NotRunByLocalNode`); init containers make the pod fail to start
  (`CreateContainerConfigError`), as does a container without `command`.
* Environment: the agent's own environment (minus KUBECONFIG) + the container's `env` and
  `envFrom` (literal values; `valueFrom.fieldRef` for metadata.name/namespace/uid/labels/
  annotations, spec.nodeName, spec.serviceAccountName, status.podIP(s), status.hostIP(s);
  `configMapKeyRef`/`secretKeyRef`), plus `HOSTNAME=<pod>`.
* Volumes map to local directories:
    persistentVolumeClaim -> <workdir>/pvc/<namespace>/<claimName>   (outlives the pod)
    emptyDir (and any unsupported type) -> <workdir>/volumes/<namespace>/<pod>-<uid8>/volumes/<name>
    hostPath -> the path itself
    configMap / secret / downwardAPI / projected -> files written into a per-pod dir as above
      (serviceAccountToken via the TokenRequest API, best effort).
  `subPath` is honoured. Per-pod directories are deleted when the pod object is gone.
* Paths: there is no mount namespace, so a program that opens `/checkpoints/x` would miss
  the volume. The agent therefore REWRITES by prefix: every env value, every command/args
  element and workingDir that equals a volumeMount's mountPath or starts with
  `<mountPath>/` is replaced by the mapped local path (longest mountPath wins). Trainer
  path variables the pod does not set but whose contract default lies under a mount
  (FT_OUTPUT_DIR=/checkpoints/output) are exported, rewritten the same way. Paths a program
  builds by itself (hard-coded, or read from a config file) are NOT rewritten: that is the
  main limitation.
* The terminationMessagePath (default /dev/termination-log) maps to
  <poddir>/termination-log; FT_TERMINATION_LOG is set to it.
* Every pod gets its own loopback IP from --pod-cidr (default 127.1.0.0/16: 127.1.x.y),
  reported as status.podIP/podIPs (hostIP 127.0.0.1) and exported as FT_METRICS_ADDR, so
  several trainers each serve metrics on :9400 and the operator scrapes podIP:9400 for real.
  hostNetwork pods get 127.0.0.1. Run a second agent with another --pod-cidr.
* Scheduling is the real scheduler's: the node offers this machine's cpu/memory (override
  with --cpu/--memory), 110 pods and --gpus fake GPUs, and no taint unless --taint is given.
  Pin pods with nodeSelector kubernetes.io/hostname=<node> or finetune.dev/local-node=true.
* stdout+stderr go to <workdir>/logs/<namespace>_<pod>.log. `kubectl logs` does NOT work
  (there is no kubelet API on this node).
* The working directory is workingDir (rewritten) when it exists or lies under a mount,
  else the per-pod directory.

Status, deletion, eviction
--------------------------
Status is written like kubelet writes it (strategic merge PATCH of pods/status): Running
with PodReadyToStartContainers/Initialized/ContainersReady/Ready, startTime, the container
running; on exit Succeeded (0) or Failed with terminated{exitCode, reason Completed|Error,
message = termination-log (<= 4096 bytes) or with FallbackToLogsOnError the log tail,
startedAt, finishedAt}. A process killed by signal N reports 128+N. A command that cannot
be executed is terminated with exit 128, reason StartError. spec.activeDeadlineSeconds is
enforced (status reason DeadlineExceeded).

A pod with a deletionTimestamp (kubectl delete, the Eviction API / `kubectl drain`, the
namespace or garbage collector) gets SIGTERM on its process group, SIGKILL after its grace
period (metadata.deletionGracePeriodSeconds, at least 2 s); then the final status is
written and the pod object deleted for good (gracePeriodSeconds=0 with a uid precondition).
A pod removed from the API without that (force delete, pod GC after node deletion) has its
process stopped the same way.

When the agent is stopped (SIGTERM/SIGINT) it behaves like kubelet's graceful node
shutdown: running pods get condition DisruptionTarget (reason TerminationByKubelet), their
processes SIGTERM, SIGKILL after min(grace, --shutdown-grace), and a final status (Failed,
reason Terminated, unless the process exited 0). A second signal kills at once. The Node
object stays (it goes NotReady after the controller-manager's 40 s grace, as a powered-off
node would). Processes never outlive the agent: each is its own process group with
PR_SET_PDEATHSIG, and a tiny reaper process kills every registered group when the agent's
pipe to it closes (even after SIGKILL of the agent).

When the agent (re)starts, a pod bound to the node that shows as Running but has no
process here lost it: it is marked Failed, container terminated exit 137 reason
ContainerStatusUnknown, message "the local node agent restarted" (no DisruptionTarget).
Pending pods start normally. If the Node object is deleted while the agent runs, the agent
does not re-register it (kubelet does not either); restart the agent.

Not simulated: image pulls (the image is ignored: the code comes from this checkout and
venv), securityContext (processes run as the agent's user), resource limits/OOMKilled,
probes, restartPolicy other than Never (a pod ends with its first container), network
isolation (pods share the host's network namespace; only the pod IP differs), kubectl
logs/exec/port-forward, real GPUs (CUDA_VISIBLE_DEVICES is inherited unchanged), node
pressure eviction, in-cluster API access (no KUBERNETES_SERVICE_* variables).
"""
from __future__ import annotations

import argparse
import base64
import ctypes
import datetime
import hashlib
import ipaddress
import json
import logging
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .kuberaw import MERGE, STRATEGIC, ApiError, Kube

log = logging.getLogger("localnode")

DEFAULT_NODE = "local-0"
NODE_LABEL = "finetune.dev/local-node"
PV_LABEL = "finetune.dev/local-node-pv"
DEFAULT_POD_CIDR = "127.1.0.0/16"
HOST_IP = "127.0.0.1"
LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION = 40
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
MAX_TERMINATION_MESSAGE = 4096          # kubelet reads at most 4 KiB of the file
FALLBACK_LOG_LINES = 80                 # kubelet: MaxContainerTerminationMessageLogLines
FALLBACK_LOG_BYTES = 2048               # kubelet: MaxContainerTerminationMessageLogLength
MIN_GRACE = 2                           # kubelet's minimum grace for a pod deleted with 0
DEFAULT_GRACE = 30
SHUTDOWN_MESSAGE = "Pod was terminated in response to imminent node shutdown."
LOST_MESSAGE = "the local node agent restarted"
REQUEST_TIMEOUT = 10.0

_PYTHON = re.compile(r"^python(3(\.\d+)?)?$")
_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")

# Resolved once in the parent: the child between fork and exec only makes this call.
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_prctl = _libc.prctl
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined names are replaced, `$$` escapes a `$`."""
    return _REF.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
                    text)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


# ---------------------------------------------------------------------------------------
# The reaper: kills every registered process group when the agent's pipe closes.
# ---------------------------------------------------------------------------------------
_REAPER_CODE = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
groups = set()
for line in sys.stdin:
    try:
        op, pgid = line[0], int(line[1:])
    except ValueError:
        continue
    if op == "+":
        groups.add(pgid)
    else:
        groups.discard(pgid)
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""


class Reaper:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-S", "-c", _REAPER_CODE],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     start_new_session=True)
        self.lock = threading.Lock()

    def _send(self, line: str) -> None:
        with self.lock:
            try:
                self.proc.stdin.write(line.encode())
                self.proc.stdin.flush()
            except (OSError, ValueError) as exc:
                log.warning("reaper pipe: %s (processes may outlive a crashed agent)", exc)

    def add(self, pgid: int) -> None:
        self._send(f"+{pgid}\n")

    def remove(self, pgid: int) -> None:
        self._send(f"-{pgid}\n")

    def close(self) -> None:
        with self.lock:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---------------------------------------------------------------------------------------
# Pod IPs
# ---------------------------------------------------------------------------------------
class IpPool:
    """Round-robin allocation from a loopback network, so a freed address is reused late."""

    def __init__(self, cidr: str):
        self.net = ipaddress.ip_network(cidr)
        if not self.net.is_loopback:
            raise ValueError(f"--pod-cidr {cidr} must be a loopback network (127.0.0.0/8)")
        self.first = int(self.net.network_address) + 2     # .0.1 stays free
        self.last = int(self.net.broadcast_address) - 1
        self.next = self.first
        self.used: set[str] = set()
        self.lock = threading.Lock()

    def reserve(self, ip: str | None) -> None:
        if ip:
            with self.lock:
                try:
                    if ipaddress.ip_address(ip) in self.net:
                        self.used.add(ip)
                except ValueError:
                    pass

    def allocate(self) -> str:
        with self.lock:
            for _ in range(self.last - self.first + 1):
                candidate = self.next
                self.next = self.first if self.next >= self.last else self.next + 1
                ip = str(ipaddress.ip_address(candidate))
                if ip.endswith(".0") or ip.endswith(".255") or ip in self.used:
                    continue
                self.used.add(ip)
                return ip
        raise RuntimeError(f"pod IP range {self.net} exhausted")

    def release(self, ip: str | None) -> None:
        with self.lock:
            self.used.discard(ip)


# ---------------------------------------------------------------------------------------
# Pod -> process translation
# ---------------------------------------------------------------------------------------
class ConfigError(Exception):
    """The pod cannot be started (kubelet: CreateContainerConfigError); retried later."""


class Mounts:
    """mountPath -> local path, longest first; `rewrite` maps a path-like string."""

    def __init__(self):
        self.pairs: list[tuple[str, str]] = []

    def add(self, mount_path: str, local: Path | str) -> None:
        mp = mount_path.rstrip("/") if mount_path != "/" else "/"
        if mp and mp != "/":
            self.pairs.append((mp, str(local)))
            self.pairs.sort(key=lambda p: len(p[0]), reverse=True)

    def rewrite(self, value: str) -> str:
        for mp, local in self.pairs:
            if value == mp:
                return local
            if value.startswith(mp + "/"):
                return local + value[len(mp):]
        return value

    def covers(self, value: str) -> bool:
        return self.rewrite(value) != value


def _trainer_path_defaults() -> dict[str, str]:
    """FT_* variables whose contract default is an absolute path (FT_OUTPUT_DIR, ...)."""
    try:
        import dataclasses

        from finetune_trainer.contract import TrainerConfig
        out = {}
        for f in dataclasses.fields(TrainerConfig):
            env = f.metadata.get("env")
            if env and isinstance(f.default, str) and f.default.startswith("/"):
                out[env] = f.default
        return out
    except Exception:  # noqa: BLE001 - the trainer package is optional here
        return {"FT_OUTPUT_DIR": "/checkpoints/output"}


class PodSpecView:
    """Read helpers over a pod dict."""

    def __init__(self, pod: dict):
        self.pod = pod
        self.meta = pod.get("metadata", {})
        self.spec = pod.get("spec", {})
        self.status = pod.get("status") or {}
        self.ns = self.meta.get("namespace", "default")
        self.name = self.meta.get("name", "")
        self.uid = self.meta.get("uid", "")
        containers = self.spec.get("containers") or [{}]
        self.container = containers[0]
        self.extra_containers = containers[1:]

    @property
    def key(self) -> str:
        return f"{self.ns}/{self.name}"

    @property
    def phase(self) -> str:
        return self.status.get("phase", "Pending")

    @property
    def terminal(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    @property
    def deleting(self) -> bool:
        return bool(self.meta.get("deletionTimestamp"))

    def grace(self) -> int:
        g = self.meta.get("deletionGracePeriodSeconds")
        if g is None:
            g = self.spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE)
        return max(int(g), MIN_GRACE)

    def container_state(self) -> dict:
        for cs in self.status.get("containerStatuses") or []:
            if cs.get("name") == self.container.get("name"):
                return cs.get("state") or {}
        return {}


# ---------------------------------------------------------------------------------------
# One pod: a worker thread that drives the pod's process and status (level-triggered).
# ---------------------------------------------------------------------------------------
class PodWorker(threading.Thread):
    def __init__(self, agent: "Agent", pod: dict):
        self.agent = agent
        self.view = PodSpecView(pod)
        super().__init__(name=f"pod-{self.view.key}", daemon=True)
        self.lock = threading.Lock()
        self.wake_event = threading.Event()
        self.wake_event.set()          # the first sync runs at once
        self.gone = False
        self.proc: subprocess.Popen | None = None
        self.pgid: int | None = None
        self.ip: str | None = None
        self.started_at: str | None = None
        self.log_offset = 0
        self.running_reported = False
        self.final_written = False
        self.final_attempts = 0
        self.last_error_status: int | None = None
        self.deleted_for_good = False
        self.term_sent_at: float | None = None
        self.kill_deadline: float | None = None
        self.killed = False
        self.stop_reason: str | None = None     # "deleted" | "shutdown" | "deadline" | "gone"
        self.disruption_written = False
        self.config_error: str | None = None
        self.config_error_at = 0.0
        self.start_error: str | None = None
        self.retry = False
        uid8 = self.view.uid[:8]
        self.pod_dir = agent.workdir / "volumes" / self.view.ns / f"{self.view.name}-{uid8}"
        self.termination_log = self.pod_dir / "termination-log"
        self.log_path = agent.log_path_for(self.view.ns, self.view.name)

    # ---- inputs -----------------------------------------------------------------------
    def update(self, pod: dict) -> None:
        with self.lock:
            self.view = PodSpecView(pod)
        self.wake()

    def mark_gone(self) -> None:
        with self.lock:
            self.gone = True
        self.wake()

    def wake(self) -> None:
        self.wake_event.set()

    # ---- loop ---------------------------------------------------------------------------
    def run(self) -> None:
        done = False
        while not done:
            self.wake_event.wait(self._timeout())
            self.wake_event.clear()
            try:
                done = self.sync()
            except Exception:  # noqa: BLE001 - a pod must never take the agent down
                log.exception("pod %s: sync failed; retrying", self.view.key)
                self.retry = True
        self.agent.worker_done(self)

    def _timeout(self) -> float:
        if self.kill_deadline is not None and not self.killed:
            return max(0.05, self.kill_deadline - time.monotonic())
        if self.retry:
            return 1.0
        if self.running() or self.config_error:
            return 5.0        # activeDeadlineSeconds, config-error retries
        return 60.0           # idle: events wake the worker

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def sync(self) -> bool:
        """Returns True when this worker has nothing left to do."""
        with self.lock:
            v, gone = self.view, self.gone
        self.retry = False
        shutdown = self.agent.shutting_down.is_set()

        if gone:
            if self.running():
                self._terminate("gone", v.grace())
                self._maybe_kill()
                return False
            if self.exited():
                self._after_exit()
            self._cleanup()
            log.info("pod %s: removed from the API; cleaned up", v.key)
            return True

        if self.proc is None:
            if shutdown:
                return True    # nothing runs here; the pod's state is left as it is
            if self.start_error is not None:
                # The command could not be executed: terminated with exit 128.
                if not self.final_written:
                    self._write_final(128, "StartError", self.start_error)
                return self._finish_or_delete(v)
            if self.final_written or v.terminal:
                return self._finish_or_delete(v)
            if v.phase == "Running" or "running" in v.container_state():
                self._mark_lost(v)
                return self._finish_or_delete(v)
            if v.deleting:
                return self._delete_for_good(v)
            self._start(v)
            return False

        if self.running():
            if not self.running_reported:
                self._report_running(v)
            if shutdown:
                if not self.disruption_written:
                    self._write_disruption(v)
                self._terminate("shutdown", min(v.grace(), self.agent.shutdown_grace))
                if self.agent.force.is_set():
                    self._kill_now()
            elif v.deleting:
                self._terminate("deleted", v.grace())
            elif self._deadline_exceeded(v):
                self._terminate("deadline", v.grace())
            self._maybe_kill()
            return False

        # exited
        self._after_exit()
        if not self.final_written:
            self._write_final_from_exit()
        if shutdown:
            return True
        return self._finish_or_delete(v)

    # ---- start -------------------------------------------------------------------------
    def _start(self, v: PodSpecView) -> None:
        if self.config_error and time.monotonic() - self.config_error_at < 10:
            return
        try:
            argv, env, cwd = self._prepare(v)
        except ConfigError as exc:
            msg = str(exc)
            if msg != self.config_error:
                log.warning("pod %s: cannot start: %s", v.key, msg)
                self._patch_status(v, {"phase": "Pending", "containerStatuses": [
                    self._container_status(v, {"waiting": {
                        "reason": "CreateContainerConfigError", "message": msg}})]})
            self.config_error, self.config_error_at = msg, time.monotonic()
            self.retry = True
            return
        self.config_error = None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            logf.write(f"--- {now_iso()} localnode {self.agent.node_name}: pod {v.key} "
                       f"uid {v.uid}: {shlex.join(argv)}\n".encode())
            logf.flush()
            self.log_offset = logf.tell()
            try:
                self.proc = self.agent.spawn(argv, env, cwd, logf)
            except OSError as exc:
                self.start_error = f"failed to start {argv[0]!r}: {exc.strerror or exc}"
                self.started_at = now_iso()
                log.warning("pod %s: %s", v.key, self.start_error)
                self.wake()
                return
        self.pgid = self.proc.pid
        self.started_at = now_iso()
        self.agent.reaper.add(self.pgid)
        threading.Thread(target=self._wait_proc, name=f"wait-{v.key}", daemon=True).start()
        log.info("pod %s: started pid %d ip %s; log %s", v.key, self.proc.pid, self.ip,
                 self.log_path)
        self._report_running(v)

    def _wait_proc(self) -> None:
        try:
            self.proc.wait()
        finally:
            self.wake()

    def _prepare(self, v: PodSpecView) -> tuple[list[str], dict[str, str], str]:
        c = v.container
        if v.spec.get("initContainers"):
            raise ConfigError("init containers are not supported by the local node agent")
        if not c.get("command"):
            raise ConfigError(f"container {c.get('name')!r} has no command: the local node agent "
                              "cannot run an image's entrypoint")
        if self.ip is None:
            self.ip = HOST_IP if v.spec.get("hostNetwork") else self.agent.ips.allocate()
        self.pod_dir.mkdir(parents=True, exist_ok=True)
        self.termination_log.write_bytes(b"")
        mounts = self._mounts(v)
        tmp_path = c.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH
        mounts.add(tmp_path, self.termination_log)

        env = {k: val for k, val in os.environ.items()
               if k != "KUBECONFIG" and not k.startswith("KUBERNETES_")}
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = venv_bin + os.pathsep + env.get("PATH", os.defpath)
        env["HOSTNAME"] = v.name
        own = self._pod_env(v, c)
        own = {k: mounts.rewrite(val) for k, val in own.items()}
        env.update(own)
        for name, default in self.agent.trainer_path_defaults.items():
            if name not in own and mounts.covers(default):
                env[name] = mounts.rewrite(default)
        env["FT_TERMINATION_LOG"] = str(self.termination_log)
        env["FT_METRICS_ADDR"] = self.ip

        argv = [mounts.rewrite(expand(a, own)) for a in
                list(c.get("command") or []) + list(c.get("args") or [])]
        if _PYTHON.match(argv[0]):
            argv[0] = sys.executable
        elif "/" not in argv[0]:
            found = shutil.which(argv[0], path=env["PATH"])
            if found:
                argv[0] = found

        cwd = str(self.pod_dir)
        wd = c.get("workingDir")
        if wd:
            local = mounts.rewrite(wd)
            if mounts.covers(wd):
                Path(local).mkdir(parents=True, exist_ok=True)
                cwd = local
            elif Path(wd).is_dir():
                cwd = wd
            else:
                log.warning("pod %s: workingDir %s does not exist here; using %s", v.key, wd, cwd)
        return argv, env, cwd

    def _mounts(self, v: PodSpecView) -> Mounts:
        volumes = {vol.get("name"): vol for vol in v.spec.get("volumes") or []}
        local: dict[str, Path] = {}
        mounts = Mounts()
        for vm in v.container.get("volumeMounts") or []:
            name = vm.get("name")
            if name not in volumes:
                raise ConfigError(f"volumeMount {name!r} has no volume")
            if name not in local:
                local[name] = self._volume_dir(v, volumes[name])
            path = local[name]
            sub = vm.get("subPath") or vm.get("subPathExpr")
            if sub:
                path = path / sub
                if not path.exists():
                    path.mkdir(parents=True, exist_ok=True)
            mounts.add(vm.get("mountPath", ""), path)
        return mounts

    def _volume_dir(self, v: PodSpecView, vol: dict) -> Path:
        name = vol["name"]
        per_pod = self.pod_dir / "volumes" / _safe(name)
        if "persistentVolumeClaim" in vol:
            path = self.agent.pvc_dir(v.ns, vol["persistentVolumeClaim"]["claimName"])
            path.mkdir(parents=True, exist_ok=True)
            return path
        if "hostPath" in vol:
            hp = vol["hostPath"]
            path = Path(hp["path"])
            kind = hp.get("type") or ""
            if kind == "DirectoryOrCreate":
                path.mkdir(parents=True, exist_ok=True)
            elif kind == "FileOrCreate":
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch(exist_ok=True)
            elif kind == "Directory" and not path.is_dir():
                raise ConfigError(f"hostPath {path} is not a directory")
            elif kind == "File" and not path.is_file():
                raise ConfigError(f"hostPath {path} is not a file")
            return path
        per_pod.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in vol:
            return per_pod
        if "configMap" in vol:
            self._write_configmap(v, vol["configMap"], per_pod)
        elif "secret" in vol:
            self._write_secret(v, vol["secret"], per_pod)
        elif "downwardAPI" in vol:
            self._write_downward(v, vol["downwardAPI"], per_pod)
        elif "projected" in vol:
            for src in vol["projected"].get("sources") or []:
                if "configMap" in src:
                    self._write_configmap(v, src["configMap"], per_pod)
                elif "secret" in src:
                    self._write_secret(v, src["secret"], per_pod)
                elif "downwardAPI" in src:
                    self._write_downward(v, src["downwardAPI"], per_pod)
                elif "serviceAccountToken" in src:
                    self._write_token(v, src["serviceAccountToken"], per_pod)
        else:
            kinds = [k for k in vol if k != "name"]
            log.warning("pod %s: volume %s of type %s is not supported; an empty directory "
                        "stands in for it", v.key, name, kinds)
        return per_pod

    @staticmethod
    def _write_items(dest: Path, data: dict[str, bytes], items: list | None) -> None:
        pairs = [(i["key"], i.get("path", i["key"])) for i in items] if items else \
            [(k, k) for k in data]
        for key, rel in pairs:
            if key not in data:
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data[key])

    def _get_object(self, kind: str, ns: str, name: str, optional: bool) -> dict | None:
        try:
            return self.agent.kube.get(f"/api/v1/namespaces/{ns}/{kind}/{name}",
                                       timeout=REQUEST_TIMEOUT)
        except ApiError as exc:
            if exc.not_found:
                if optional:
                    return None
                raise ConfigError(f"{kind[:-1]} {name!r} not found") from exc
            raise ConfigError(f"reading {kind[:-1]} {name!r}: {exc}") from exc

    def _configmap_data(self, ns: str, name: str, optional: bool) -> dict[str, bytes]:
        cm = self._get_object("configmaps", ns, name, optional) or {}
        data = {k: val.encode() for k, val in (cm.get("data") or {}).items()}
        data.update({k: base64.b64decode(val) for k, val in (cm.get("binaryData") or {}).items()})
        return data

    def _secret_data(self, ns: str, name: str, optional: bool) -> dict[str, bytes]:
        s = self._get_object("secrets", ns, name, optional) or {}
        return {k: base64.b64decode(val) for k, val in (s.get("data") or {}).items()}

    def _write_configmap(self, v, src: dict, dest: Path) -> None:
        self._write_items(dest, self._configmap_data(v.ns, src.get("name", ""),
                                                     bool(src.get("optional"))), src.get("items"))

    def _write_secret(self, v, src: dict, dest: Path) -> None:
        name = src.get("secretName") or src.get("name", "")
        self._write_items(dest, self._secret_data(v.ns, name, bool(src.get("optional"))),
                          src.get("items"))

    def _write_downward(self, v, src: dict, dest: Path) -> None:
        for item in src.get("items") or []:
            ref = item.get("fieldRef")
            if not ref:
                continue
            target = dest / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(self._field(v, ref.get("fieldPath", "")))

    def _write_token(self, v, src: dict, dest: Path) -> None:
        sa = v.spec.get("serviceAccountName") or "default"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
            "audiences": [src["audience"]] if src.get("audience") else [],
            "expirationSeconds": int(src.get("expirationSeconds") or 3607),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": v.name, "uid": v.uid}}}
        try:
            res = self.agent.kube.request(
                "POST", f"/api/v1/namespaces/{v.ns}/serviceaccounts/{sa}/token", body=body,
                timeout=REQUEST_TIMEOUT)
            (dest / src.get("path", "token")).write_text(res["status"]["token"])
        except (ApiError, KeyError, TypeError) as exc:
            log.info("pod %s: no service account token (%s); skipped", v.key, exc)

    def _field(self, v: PodSpecView, path: str) -> str:
        m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path)
        if m:
            return (v.meta.get(m.group(1)) or {}).get(m.group(2), "")
        simple = {
            "metadata.name": v.name, "metadata.namespace": v.ns, "metadata.uid": v.uid,
            "spec.nodeName": self.agent.node_name,
            "spec.serviceAccountName": v.spec.get("serviceAccountName", "default"),
            "status.podIP": self.ip or "", "status.podIPs": self.ip or "",
            "status.hostIP": HOST_IP, "status.hostIPs": HOST_IP,
        }
        if path in simple:
            return simple[path]
        if path in ("metadata.labels", "metadata.annotations"):
            d = v.meta.get(path.split(".")[1]) or {}
            return "\n".join(f'{k}="{val}"' for k, val in sorted(d.items()))
        raise ConfigError(f"fieldRef {path!r} is not supported by the local node agent")

    def _pod_env(self, v: PodSpecView, c: dict) -> dict[str, str]:
        out: dict[str, str] = {}
        for src in c.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "configMapRef" in src:
                ref = src["configMapRef"]
                data = self._configmap_data(v.ns, ref.get("name", ""), bool(ref.get("optional")))
            elif "secretRef" in src:
                ref = src["secretRef"]
                data = self._secret_data(v.ns, ref.get("name", ""), bool(ref.get("optional")))
            else:
                continue
            out.update({prefix + k: val.decode(errors="replace") for k, val in data.items()})
        for e in c.get("env") or []:
            name = e.get("name")
            vf = e.get("valueFrom")
            if not vf:
                out[name] = expand(e.get("value", "") or "", out)
            elif "fieldRef" in vf:
                out[name] = self._field(v, vf["fieldRef"].get("fieldPath", ""))
            elif "configMapKeyRef" in vf or "secretKeyRef" in vf:
                is_cm = "configMapKeyRef" in vf
                ref = vf["configMapKeyRef" if is_cm else "secretKeyRef"]
                optional = bool(ref.get("optional"))
                data = (self._configmap_data if is_cm else self._secret_data)(
                    v.ns, ref.get("name", ""), optional)
                if ref.get("key") in data:
                    out[name] = data[ref["key"]].decode(errors="replace")
                elif not optional:
                    raise ConfigError(f"key {ref.get('key')!r} not found in "
                                      f"{'configmap' if is_cm else 'secret'} {ref.get('name')!r}")
            else:
                raise ConfigError(f"env {name}: valueFrom {sorted(vf)} is not supported by the "
                                  "local node agent")
        return out

    # ---- status ------------------------------------------------------------------------
    def _container_status(self, v: PodSpecView, state: dict, ready: bool = False) -> dict:
        c = v.container
        cs = {"name": c.get("name", ""), "image": c.get("image", ""), "imageID": "",
              "ready": ready, "started": "running" in state, "restartCount": 0, "state": state}
        if self.proc is not None:
            cs["containerID"] = f"localnode://{self.agent.node_name}/{self.proc.pid}"
        return cs

    def _extra_statuses(self, v: PodSpecView) -> list[dict]:
        return [{"name": c.get("name", ""), "image": c.get("image", ""), "imageID": "",
                 "ready": False, "started": False, "restartCount": 0,
                 "state": {"waiting": {"reason": "NotRunByLocalNode", "message":
                                       "the local node agent runs only the first container"}}}
                for c in v.extra_containers]

    def _patch_status(self, v: PodSpecView, status: dict) -> bool:
        try:
            self.agent.kube.request(
                "PATCH", f"/api/v1/namespaces/{v.ns}/pods/{v.name}/status",
                body={"metadata": {"uid": v.uid}, "status": status}, content_type=STRATEGIC,
                timeout=REQUEST_TIMEOUT)
            return True
        except ApiError as exc:
            if exc.not_found or exc.conflict:
                log.info("pod %s: gone while writing status", v.key)
                self.mark_gone()
                return True
            log.warning("pod %s: status write failed (%s); will retry", v.key, exc)
            self.last_error_status = exc.status
            self.retry = True
            return False

    def _ips(self) -> dict:
        ip = self.ip or HOST_IP
        return {"podIP": ip, "podIPs": [{"ip": ip}], "hostIP": HOST_IP,
                "hostIPs": [{"ip": HOST_IP}]}

    def _report_running(self, v: PodSpecView) -> None:
        now = now_iso()
        ready = not v.extra_containers
        conds = [
            {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": "True" if ready else "False",
             "lastTransitionTime": now, **({} if ready else {"reason": "ContainersNotReady"})},
            {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": now,
             **({} if ready else {"reason": "ContainersNotReady"})},
        ]
        if not any(c.get("type") == "PodScheduled" for c in v.status.get("conditions") or []):
            conds.append({"type": "PodScheduled", "status": "True", "lastTransitionTime": now})
        status = {"phase": "Running", "startTime": v.status.get("startTime") or self.started_at,
                  **self._ips(), "conditions": conds,
                  "containerStatuses": [self._container_status(
                      v, {"running": {"startedAt": self.started_at}}, ready=True),
                      *self._extra_statuses(v)]}
        if self._patch_status(v, status):
            self.running_reported = True

    def _termination_message(self, v: PodSpecView, exit_code: int) -> str:
        try:
            with open(self.termination_log, "rb") as f:
                msg = f.read(MAX_TERMINATION_MESSAGE).decode(errors="replace")
        except OSError:
            msg = ""
        policy = v.container.get("terminationMessagePolicy", "File")
        if not msg.strip() and exit_code != 0 and policy == "FallbackToLogsOnError":
            try:
                with open(self.log_path, "rb") as f:
                    f.seek(self.log_offset)
                    lines = f.read().decode(errors="replace").splitlines()[-FALLBACK_LOG_LINES:]
                msg = "\n".join(lines)
                if len(msg.encode()) > FALLBACK_LOG_BYTES:
                    msg = msg.encode()[-FALLBACK_LOG_BYTES:].decode(errors="ignore")
            except OSError:
                pass
        return msg

    def _write_final_from_exit(self) -> None:
        v = self.view
        rc = self.proc.returncode
        exit_code = 128 - rc if rc < 0 else rc
        reason = "Completed" if exit_code == 0 else "Error"
        pod_reason = pod_message = None
        if self.stop_reason == "shutdown" and exit_code != 0:
            pod_reason, pod_message = "Terminated", SHUTDOWN_MESSAGE
        elif self.stop_reason == "deadline":
            pod_reason = "DeadlineExceeded"
            pod_message = (f"Pod was active on the node longer than the specified deadline "
                           f"({v.spec.get('activeDeadlineSeconds')}s)")
        self._write_final(exit_code, reason, self._termination_message(v, exit_code),
                          pod_reason=pod_reason, pod_message=pod_message)

    def _write_final(self, exit_code: int, reason: str, message: str, *, started_at=None,
                     pod_reason=None, pod_message=None, phase=None) -> None:
        v = self.view
        now = now_iso()
        term = {"exitCode": exit_code, "reason": reason,
                "startedAt": started_at or self.started_at or now, "finishedAt": now}
        if message:
            term["message"] = message
        if self.proc is not None:
            term["containerID"] = f"localnode://{self.agent.node_name}/{self.proc.pid}"
        phase = phase or ("Succeeded" if exit_code == 0 else "Failed")
        conds = [
            {"type": "PodReadyToStartContainers", "status": "False", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": "False", "reason": "PodCompleted",
             "lastTransitionTime": now},
            {"type": "Ready", "status": "False", "reason": "PodCompleted",
             "lastTransitionTime": now},
        ]
        status = {"phase": phase, "conditions": conds,
                  "startTime": v.status.get("startTime") or self.started_at or now,
                  **self._ips(),
                  "containerStatuses": [self._container_status(v, {"terminated": term}),
                                        *self._extra_statuses(v)]}
        if pod_reason:
            status["reason"] = pod_reason
            status["message"] = pod_message or ""
        ok = self._patch_status(v, status)
        self.final_attempts += 1
        # Retry while the API server is unreachable or busy; give up only on a request it
        # keeps rejecting (4xx), so one bad field cannot wedge the worker.
        rejected = self.last_error_status is not None and 400 <= self.last_error_status < 500 \
            and self.last_error_status != 429
        if ok or (rejected and self.final_attempts >= 5):
            self.final_written = True
            log.info("pod %s: %s exit %d %s%s", v.key, phase, exit_code, reason,
                     f" ({pod_reason})" if pod_reason else "")

    def _mark_lost(self, v: PodSpecView) -> None:
        started = (v.container_state().get("running") or {}).get("startedAt")
        self.ip = v.status.get("podIP") or self.ip
        log.info("pod %s: was running but has no process on this agent", v.key)
        self._write_final(137, "ContainerStatusUnknown", LOST_MESSAGE, started_at=started,
                          phase="Failed")

    def _write_disruption(self, v: PodSpecView) -> None:
        cond = {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
                "message": SHUTDOWN_MESSAGE, "lastTransitionTime": now_iso()}
        try:
            self.agent.kube.request(
                "PATCH", f"/api/v1/namespaces/{v.ns}/pods/{v.name}/status",
                body={"status": {"conditions": [cond]}}, content_type=STRATEGIC, timeout=5)
        except ApiError as exc:
            log.warning("pod %s: could not add DisruptionTarget: %s", v.key, exc)
        self.disruption_written = True

    # ---- stop ---------------------------------------------------------------------------
    def _deadline_exceeded(self, v: PodSpecView) -> bool:
        limit = v.spec.get("activeDeadlineSeconds")
        start = parse_time(v.status.get("startTime") or self.started_at)
        return bool(limit and start and time.time() - start > int(limit))

    def _terminate(self, why: str, grace: float) -> None:
        now = time.monotonic()
        if self.term_sent_at is None:
            self.term_sent_at = now
            self.stop_reason = why
            self.kill_deadline = now + grace
            log.info("pod %s: %s: SIGTERM to process group %d, SIGKILL in %ds",
                     self.view.key, why, self.pgid, grace)
            self._signal(signal.SIGTERM)
        else:
            # A shorter grace (a second delete, a forced shutdown) wins.
            self.kill_deadline = min(self.kill_deadline, self.term_sent_at + grace)

    def _maybe_kill(self) -> None:
        if self.kill_deadline is not None and not self.killed \
                and time.monotonic() >= self.kill_deadline and self.running():
            log.info("pod %s: grace period over: SIGKILL", self.view.key)
            self._kill_now()

    def _kill_now(self) -> None:
        if self.running():
            self.killed = True
            self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self.pgid is None:
            return
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass
        except OSError as exc:
            log.warning("pod %s: signal %d: %s", self.view.key, sig, exc)

    def _after_exit(self) -> None:
        """The main process exited: like a container runtime, kill what it left behind."""
        if self.pgid is not None:
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except OSError:
                pass
            self.agent.reaper.remove(self.pgid)
            self.pgid = None
            if self.ip and self.ip != HOST_IP:
                self.agent.ips.release(self.ip)

    def _finish_or_delete(self, v: PodSpecView) -> bool:
        if v.deleting and not self.deleted_for_good:
            return self._delete_for_good(v)
        self.retry = self.retry or not self.final_written
        return False   # wait for the pod object to go (its emptyDirs live until then)

    def _delete_for_good(self, v: PodSpecView) -> bool:
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                "preconditions": {"uid": v.uid}}
        try:
            self.agent.kube.request("DELETE", f"/api/v1/namespaces/{v.ns}/pods/{v.name}",
                                    body=body, timeout=REQUEST_TIMEOUT)
            log.info("pod %s: deleted (grace 0)", v.key)
            self.deleted_for_good = True
        except ApiError as exc:
            if exc.not_found or exc.conflict:
                self.deleted_for_good = True
                self.mark_gone()
            else:
                log.warning("pod %s: delete failed (%s); will retry", v.key, exc)
                self.retry = True
        return False

    def _cleanup(self) -> None:
        if self.ip and self.ip != HOST_IP:
            self.agent.ips.release(self.ip)
        shutil.rmtree(self.pod_dir, ignore_errors=True)

    def stop_for_shutdown_timeout(self) -> None:
        """Last resort when the agent's shutdown deadline passed."""
        self._kill_now()
        if self.pgid is not None:
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------
# The agent
# ---------------------------------------------------------------------------------------
def _memory_quantity() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1])}Ki"
    except OSError:
        pass
    return "8Gi"


def _arch() -> str:
    m = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)


class Agent:
    def __init__(self, kube: Kube, node_name: str = DEFAULT_NODE, gpus: int = 2,
                 workdir: Path | str = ".", cpu: str | None = None, memory: str | None = None,
                 pods: int = 110, pod_cidr: str = DEFAULT_POD_CIDR,
                 labels: dict[str, str] | None = None, taints: list[dict] | None = None,
                 lease_interval: float = 10.0,
                 status_interval: float = 20.0, resync_interval: float = 30.0,
                 shutdown_grace: float = 30.0):
        self.kube = kube
        self.node_name = node_name
        self.gpus = gpus
        self.workdir = Path(workdir).resolve()
        self.cpu = cpu or str(os.cpu_count() or 1)
        self.memory = memory or _memory_quantity()
        self.pods = pods
        self.ips = IpPool(pod_cidr)
        self.extra_labels = labels or {}
        self.taints = taints or []
        self.lease_interval = lease_interval
        self.status_interval = status_interval
        self.resync_interval = resync_interval
        self.shutdown_grace = shutdown_grace
        self.stop_event = threading.Event()
        self.shutting_down = threading.Event()
        self.force = threading.Event()
        self.lock = threading.Lock()
        self.workers: dict[str, PodWorker] = {}
        self.finished: OrderedDict[str, None] = OrderedDict()
        self.node_uid: str | None = None
        self.ready_since: str | None = None
        self.node_missing_logged = False
        self.status_failed = False
        self.kubelet_version = "v0.0.0"
        self.trainer_path_defaults = _trainer_path_defaults()
        self.reaper: Reaper | None = None
        self._spawner: ThreadPoolExecutor | None = None

    # ---- paths ----------------------------------------------------------------------------
    def log_path_for(self, ns: str, pod: str) -> Path:
        return self.workdir / "logs" / f"{ns}_{pod}.log"

    def pvc_dir(self, ns: str, claim: str) -> Path:
        return self.workdir / "pvc" / ns / claim

    # ---- processes --------------------------------------------------------------------------
    def spawn(self, argv, env, cwd, logf) -> subprocess.Popen:
        """Starts a process from the one long-lived spawner thread: PR_SET_PDEATHSIG fires
        when the *thread* that forked the child exits, so it must not be a pod thread."""
        def do():
            return subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                    stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        return self._spawner.submit(do).result()

    # ---- node ---------------------------------------------------------------------------------
    def _resources(self) -> dict[str, str]:
        try:
            st = os.statvfs(self.workdir)
            eph = str(st.f_blocks * st.f_frsize)
        except OSError:
            eph = "100Gi"
        return {"cpu": self.cpu, "memory": self.memory, "pods": str(self.pods),
                "ephemeral-storage": eph, "nvidia.com/gpu": str(self.gpus)}

    def _labels(self) -> dict[str, str]:
        return {NODE_LABEL: "true", "kubernetes.io/hostname": self.node_name,
                "kubernetes.io/os": "linux", "kubernetes.io/arch": _arch(),
                **self.extra_labels}

    def _node_status(self) -> dict:
        now = now_iso()
        since = self.ready_since or now
        res = self._resources()

        def cond(type_, status, reason, message, transition=now):
            return {"type": type_, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": now, "lastTransitionTime": transition}
        return {
            "capacity": res, "allocatable": res,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory",
                     "local node agent: memory pressure is not simulated", since),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure",
                     "local node agent: disk pressure is not simulated", since),
                cond("PIDPressure", "False", "KubeletHasSufficientPID",
                     "local node agent: PID pressure is not simulated", since),
                cond("Ready", "True", "KubeletReady",
                     "local node agent (finetune_testbed.localnode) is posting ready status",
                     since),
            ],
            "addresses": [{"type": "InternalIP", "address": HOST_IP},
                          {"type": "Hostname", "address": self.node_name}],
            "nodeInfo": {
                "machineID": "", "systemUUID": "", "bootID": "",
                "kernelVersion": platform.release(), "osImage": "finetune local node agent",
                "containerRuntimeVersion": "localnode://0.1",
                "kubeletVersion": self.kubelet_version, "kubeProxyVersion": "",
                "operatingSystem": "linux", "architecture": _arch()},
        }

    def register(self) -> None:
        try:
            self.kubelet_version = self.kube.get("/version", timeout=REQUEST_TIMEOUT)["gitVersion"]
        except (ApiError, KeyError, TypeError):
            self.kubelet_version = "v0.0.0"
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.node_name, "labels": self._labels()},
                "spec": {"taints": self.taints} if self.taints else {},
                "status": self._node_status()}
        try:
            node = self.kube.request("POST", "/api/v1/nodes", body=body, timeout=REQUEST_TIMEOUT)
            log.info("node %s: registered", self.node_name)
        except ApiError as exc:
            if not exc.conflict:
                raise
            node = self.kube.request(
                "PATCH", f"/api/v1/nodes/{self.node_name}",
                body={"metadata": {"labels": self._labels()}}, content_type=MERGE,
                timeout=REQUEST_TIMEOUT)
            if "kwok.x-k8s.io/node" in (node["metadata"].get("annotations") or {}):
                log.warning("node %s carries the kwok annotation: kwok will fight this agent",
                            self.node_name)
            for c in node.get("status", {}).get("conditions") or []:
                if c.get("type") == "Ready" and c.get("status") == "True":
                    self.ready_since = c.get("lastTransitionTime")
            log.info("node %s: already registered; taking it over", self.node_name)
        self.node_uid = node["metadata"]["uid"]
        self.ready_since = self.ready_since or now_iso()
        if not self.post_node_status():
            raise RuntimeError("could not write the node status")
        self.renew_lease()

    def post_node_status(self) -> bool:
        if self.status_failed:
            # The heartbeat lapsed for a while: if the node controller marked us NotReady
            # or Unknown meanwhile, Ready becomes True again now.
            try:
                node = self.kube.get(f"/api/v1/nodes/{self.node_name}", timeout=REQUEST_TIMEOUT)
                ready = [c for c in node.get("status", {}).get("conditions") or []
                         if c.get("type") == "Ready"]
                if not ready or ready[0].get("status") != "True":
                    self.ready_since = now_iso()
            except ApiError:
                pass
        try:
            node = self.kube.request(
                "PATCH", f"/api/v1/nodes/{self.node_name}/status",
                body={"status": self._node_status()}, content_type=STRATEGIC,
                timeout=REQUEST_TIMEOUT)
            self.node_missing_logged = False
            self.status_failed = False
            return bool(node)
        except ApiError as exc:
            self.status_failed = True
            self._heartbeat_error("node status", exc)
            return False

    def _heartbeat_error(self, what: str, exc: ApiError) -> None:
        if exc.not_found and what == "node status":
            if not self.node_missing_logged:
                log.warning("node %s: the Node object was deleted; not re-registering "
                            "(as kubelet); restart the agent to register again",
                            self.node_name)
                self.node_missing_logged = True
            return
        log.warning("node %s: %s heartbeat failed: %s", self.node_name, what, exc)

    def renew_lease(self) -> bool:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{self.node_name}"
        spec = {"holderIdentity": self.node_name, "leaseDurationSeconds": LEASE_DURATION,
                "renewTime": now_micro()}
        try:
            self.kube.request("PATCH", path, body={"spec": spec}, content_type=MERGE,
                              timeout=REQUEST_TIMEOUT)
            return True
        except ApiError as exc:
            if not exc.not_found:
                self._heartbeat_error("lease", exc)
                return False
        if self.node_missing_logged:
            return False   # no Node, no Lease (it would be garbage collected anyway)
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.node_name, "namespace": LEASE_NAMESPACE,
                             "ownerReferences": [{"apiVersion": "v1", "kind": "Node",
                                                  "name": self.node_name,
                                                  "uid": self.node_uid}]},
                "spec": spec}
        try:
            self.kube.request("POST", f"/apis/coordination.k8s.io/v1/namespaces/"
                              f"{LEASE_NAMESPACE}/leases", body=body, timeout=REQUEST_TIMEOUT)
            return True
        except ApiError as exc:
            self._heartbeat_error("lease", exc)
            return False

    def heartbeat_loop(self) -> None:
        next_lease = time.monotonic() + self.lease_interval
        next_status = time.monotonic() + self.status_interval
        while True:
            wait = max(0.0, min(next_lease, next_status) - time.monotonic())
            if self.stop_event.wait(wait):
                return
            now = time.monotonic()
            try:
                if now >= next_lease:
                    ok = self.renew_lease()
                    next_lease = now + (self.lease_interval if ok else 2.0)
                if now >= next_status:
                    ok = self.post_node_status()
                    next_status = now + (self.status_interval if ok else 2.0)
            except Exception:  # noqa: BLE001
                log.exception("node %s: heartbeat", self.node_name)
                next_lease = next_status = now + 2.0

    # ---- pods -----------------------------------------------------------------------------------
    def dispatch(self, event: str, pod: dict) -> None:
        meta = pod.get("metadata") or {}
        uid = meta.get("uid")
        if not uid:
            return
        status = pod.get("status") or {}
        log.log(logging.DEBUG if event == "LISTED" else logging.INFO,
                "event %s pod %s/%s phase=%s%s", event, meta.get("namespace"), meta.get("name"),
                 status.get("phase"), " deleting" if meta.get("deletionTimestamp") else "")
        with self.lock:
            w = self.workers.get(uid)
            if event == "DELETED":
                if w:
                    w.mark_gone()
                return
            if w is None:
                if uid in self.finished or self.shutting_down.is_set():
                    return
                w = PodWorker(self, pod)
                self.workers[uid] = w
                w.start()
                return
        w.update(pod)

    def worker_done(self, w: PodWorker) -> None:
        with self.lock:
            self.workers.pop(w.view.uid, None)
            self.finished[w.view.uid] = None
            while len(self.finished) > 2000:
                self.finished.popitem(last=False)

    def watch_loop(self) -> None:
        path = "/api/v1/pods"
        selector = f"spec.nodeName={self.node_name}"
        backoff = 1.0
        while not self.stop_event.is_set():
            try:
                lst = self.kube.get(path, query={"fieldSelector": selector},
                                    timeout=REQUEST_TIMEOUT * 3)
                rv = lst["metadata"]["resourceVersion"]
                items = lst.get("items") or []
                seen = {pod["metadata"]["uid"] for pod in items}
                for pod in items:      # before any new pod is given an address
                    self.ips.reserve((pod.get("status") or {}).get("podIP"))
                for pod in items:
                    self.dispatch("LISTED", pod)
                with self.lock:
                    missing = [w for uid, w in self.workers.items() if uid not in seen]
                for w in missing:
                    log.info("resync: pod %s no longer exists", w.view.key)
                    w.mark_gone()
                backoff = 1.0
                deadline = time.monotonic() + self.resync_interval
                while not self.stop_event.is_set():
                    remaining = deadline - time.monotonic()
                    if remaining <= 1:
                        break
                    query = {"fieldSelector": selector, "resourceVersion": rv,
                             "allowWatchBookmarks": "true", "timeoutSeconds": int(remaining)}
                    restart = False
                    for ev in self.kube.watch(path, query, timeout=remaining + 15):
                        kind, obj = ev.get("type"), ev.get("object") or {}
                        if kind == "ERROR":
                            log.info("watch: %s; re-listing", obj.get("message"))
                            restart = True
                            break
                        rv = (obj.get("metadata") or {}).get("resourceVersion", rv)
                        if kind == "BOOKMARK":
                            continue
                        self.dispatch(kind, obj)
                        if self.stop_event.is_set():
                            break
                    if restart:
                        break
            except ApiError as exc:
                log.warning("pod watch: %s; re-listing in %.0fs", exc, backoff)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception:  # noqa: BLE001
                log.exception("pod watch crashed; re-listing in %.0fs", backoff)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    # ---- lifecycle ------------------------------------------------------------------------------
    def run(self) -> int:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        log.info("finetune local node agent (a development/test stand-in for kubelet, not part "
                 "of deploy/): node %s, %d fake nvidia.com/gpu, pod IPs from %s, workdir %s; "
                 "pod output goes to %s/<namespace>_<pod>.log (kubectl logs does not work)",
                 self.node_name, self.gpus, self.ips.net, self.workdir, self.workdir / "logs")
        self.reaper = Reaper()
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spawner")
        try:
            while True:
                try:
                    self.register()
                    break
                except ApiError as exc:
                    log.warning("node %s: registration failed (%s); retrying", self.node_name,
                                exc)
                    if self.stop_event.wait(2.0):
                        return 0
            threads = [threading.Thread(target=self.heartbeat_loop, name="heartbeat", daemon=True),
                       threading.Thread(target=self.watch_loop, name="pod-watch", daemon=True)]
            for t in threads:
                t.start()
            while not self.stop_event.wait(1.0):
                pass
        finally:
            self.shutdown()
        return 0

    def request_stop(self, signum=None, _frame=None) -> None:
        if self.stop_event.is_set():
            log.info("second signal: killing pod processes now")
            self.force.set()
            with self.lock:
                workers = list(self.workers.values())
            for w in workers:
                w.wake()
            return
        log.info("stopping (signal %s): terminating pods like a graceful node shutdown", signum)
        self.stop_event.set()

    def shutdown(self) -> None:
        self.stop_event.set()
        self.shutting_down.set()
        with self.lock:
            workers = list(self.workers.values())
        active = [w for w in workers if w.running()]
        for w in workers:
            w.wake()
        deadline = time.monotonic() + self.shutdown_grace + 15
        for w in workers:
            w.join(max(0.0, deadline - time.monotonic()))
        for w in workers:
            if w.is_alive():
                w.stop_for_shutdown_timeout()
        if self.reaper:
            self.reaper.close()
        if self._spawner:
            self._spawner.shutdown(wait=False)
        log.info("stopped (%d pod process(es) terminated)", len(active))


# ---------------------------------------------------------------------------------------
# Library API for tests and the demo
# ---------------------------------------------------------------------------------------
class LocalNode:
    """Runs the agent as a subprocess (`python -m finetune_testbed.localnode`) that dies with
    the calling thread's process (PR_SET_PDEATHSIG; create it from a long-lived thread)."""

    def __init__(self, kubeconfig: str | Path, node_name: str = DEFAULT_NODE, gpus: int = 2,
                 workdir: str | Path | None = None, pod_cidr: str = DEFAULT_POD_CIDR,
                 cpu: str | None = None, memory: str | None = None,
                 shutdown_grace: float = 30.0, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None):
        import tempfile
        self.kubeconfig = Path(kubeconfig)
        self.node_name = node_name
        self.gpus = gpus
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="localnode-"))
        self.workdir = self.workdir.resolve()
        self.pod_cidr = pod_cidr
        self.cpu, self.memory = cpu, memory
        self.shutdown_grace = shutdown_grace
        self.extra_args = list(extra_args or [])
        self.env = env
        self.proc = None
        self._kube: Kube | None = None

    @property
    def kube(self) -> Kube:
        if self._kube is None:
            self._kube = Kube(self.kubeconfig)
        return self._kube

    @property
    def log_path(self) -> Path:
        """The agent's own log."""
        return self.workdir / "agent.log"

    def log_path_for(self, ns: str, pod: str) -> Path:
        return self.workdir / "logs" / f"{ns}_{pod}.log"

    def pvc_dir(self, ns: str, claim: str) -> Path:
        return self.workdir / "pvc" / ns / claim

    def uri_dir(self, ns: str, uri: str) -> Path | None:
        """A status path `pvc://<claim>/<path>` as a directory on this node (None: not one)."""
        from finetune_operator.storage import split_claim_uri

        split = split_claim_uri(uri)
        return None if split is None else self.pvc_dir(ns, split[0]) / split[1]

    def argv(self) -> list[str]:
        args = [sys.executable, "-m", "finetune_testbed.localnode",
                "--kubeconfig", str(self.kubeconfig), "--node", self.node_name,
                "--gpus", str(self.gpus), "--workdir", str(self.workdir),
                "--pod-cidr", self.pod_cidr, "--shutdown-grace", str(self.shutdown_grace)]
        if self.cpu:
            args += ["--cpu", self.cpu]
        if self.memory:
            args += ["--memory", self.memory]
        return args + self.extra_args

    def start(self, timeout: float = 60) -> "LocalNode":
        from .procs import Proc, wait_for
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = Proc("agent", self.argv(), self.workdir, env=self.env)
        self.proc.start()
        wait_for(self.ready, timeout, f"local node {self.node_name} Ready", interval=0.3,
                 procs=[self.proc])
        return self

    def ready(self) -> bool:
        node = self.kube.get(f"/api/v1/nodes/{self.node_name}", timeout=5)
        conds = {c["type"]: c for c in node.get("status", {}).get("conditions") or []}
        return conds.get("Ready", {}).get("status") == "True" and \
            node["status"].get("allocatable", {}).get("nvidia.com/gpu") == str(self.gpus)

    def running(self) -> bool:
        return self.proc is not None and self.proc.running()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (graceful node shutdown of its pods), then SIGKILL after `timeout`."""
        if self.proc is None:
            return None
        self.proc.stop(timeout if timeout is not None else self.shutdown_grace + 20)
        return self.proc.popen.returncode

    def kill(self) -> None:
        """SIGKILL the agent (a crash): its pod processes die with it."""
        if self.proc is not None:
            self.proc.kill()

    def create_pvc(self, ns: str, claim: str, size: str = "1Gi") -> Path:
        """A PersistentVolume (hostPath = pvc_dir) pre-bound to a new claim, so the scheduler
        and the PV controller treat the claim as Bound. Returns the local directory."""
        path = self.pvc_dir(ns, claim)
        path.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha1(f"{ns}/{claim}".encode()).hexdigest()[:8]
        pv_name = f"{self.node_name}-{ns}-{claim}"[:200] + f"-{digest}"
        pv = {"apiVersion": "v1", "kind": "PersistentVolume",
              "metadata": {"name": pv_name, "labels": {PV_LABEL: self.node_name}},
              "spec": {"capacity": {"storage": size}, "accessModes": ["ReadWriteOnce"],
                       "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                       "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
                       "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                    "namespace": ns, "name": claim}}}
        pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
               "metadata": {"name": claim, "namespace": ns},
               "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "",
                        "volumeName": pv_name, "resources": {"requests": {"storage": size}}}}
        for url, obj in (("/api/v1/persistentvolumes", pv),
                         (f"/api/v1/namespaces/{ns}/persistentvolumeclaims", pvc)):
            try:
                self.kube.request("POST", url, body=obj)
            except ApiError as exc:
                if not exc.conflict:
                    raise
        return path

    def delete_node(self) -> None:
        """Removes the Node, its Lease and the PVs create_pvc made (cluster-scoped objects)."""
        for path in (f"/api/v1/nodes/{self.node_name}",
                     f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/"
                     f"{self.node_name}"):
            try:
                self.kube.request("DELETE", path)
            except ApiError as exc:
                if not exc.not_found:
                    raise
        try:
            pvs = self.kube.get("/api/v1/persistentvolumes",
                                query={"labelSelector": f"{PV_LABEL}={self.node_name}"})
            for pv in pvs.get("items") or []:
                try:
                    self.kube.request("DELETE",
                                      f"/api/v1/persistentvolumes/{pv['metadata']['name']}")
                except ApiError as exc:
                    if not exc.not_found:
                        raise
        except ApiError as exc:
            log.warning("listing local PVs: %s", exc)

    def cleanup(self) -> None:
        self.stop()
        self.delete_node()
        if self._kube:
            self._kube.close()
            self._kube = None

    def __enter__(self) -> "LocalNode":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
def _default_kubeconfig() -> str | None:
    if os.environ.get("KUBECONFIG"):
        return os.environ["KUBECONFIG"]
    try:
        from .__main__ import STATE_FILE
        return json.loads(STATE_FILE.read_text())["kubeconfig"]
    except (OSError, ValueError, KeyError, ImportError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m finetune_testbed.localnode",
        description="Local node agent: a development/test stand-in for kubelet that runs the "
                    "pods bound to its Node as local processes. Never part of deploy/.")
    p.add_argument("--kubeconfig", default=None,
                   help="default: $KUBECONFIG, else the one of `python -m finetune_testbed up`")
    p.add_argument("--node", default=DEFAULT_NODE)
    p.add_argument("--gpus", type=int, default=2, help="fake nvidia.com/gpu capacity")
    p.add_argument("--workdir", default=None, help="default: .state/localnode/<node>")
    p.add_argument("--cpu", default=None, help="cpu capacity (default: this machine's)")
    p.add_argument("--memory", default=None, help="memory capacity (default: this machine's)")
    p.add_argument("--pods", type=int, default=110)
    p.add_argument("--pod-cidr", default=DEFAULT_POD_CIDR,
                   help="loopback range for pod IPs; give each agent its own")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--taint", action="append", default=[], metavar="KEY[=VALUE]:EFFECT",
                   help="register with this taint (only at creation), e.g. to keep other "
                        "tests' pods off the node")
    p.add_argument("--lease-interval", type=float, default=10.0)
    p.add_argument("--status-interval", type=float, default=20.0,
                   help="seconds between Ready heartbeats (keep under the 40 s grace)")
    p.add_argument("--resync", type=float, default=30.0, help="seconds between pod re-lists")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="longest wait for pods' processes when the agent stops")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format=f"%(asctime)s localnode[{args.node}] %(levelname)s %(message)s",
                        stream=sys.stderr)
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    kubeconfig = args.kubeconfig or _default_kubeconfig()
    if not kubeconfig:
        p.error("no kubeconfig: pass --kubeconfig, set KUBECONFIG or run "
                "`python -m finetune_testbed up`")
    if args.workdir is None:
        from .cluster import REPO
        state = Path(os.environ.get("FINETUNE_STATE_DIR", REPO / ".state"))
        args.workdir = state / "localnode" / args.node
    labels = dict(item.split("=", 1) for item in args.label)
    taints = []
    for item in args.taint:
        kv, _, effect = item.rpartition(":")
        key, _, value = kv.partition("=")
        taints.append({"key": key, "effect": effect, **({"value": value} if value else {})})
    agent = Agent(Kube(kubeconfig), node_name=args.node, gpus=args.gpus, workdir=args.workdir,
                  cpu=args.cpu, memory=args.memory, pods=args.pods, pod_cidr=args.pod_cidr,
                  labels=labels, taints=taints, lease_interval=args.lease_interval,
                  status_interval=args.status_interval, resync_interval=args.resync,
                  shutdown_grace=args.shutdown_grace)
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
    return agent.run()


if __name__ == "__main__":
    sys.exit(main())
