"""A real node for the test bed: the kubelet, containerd, runc and the CNI bridge plugin on
this machine, joined to the local control plane. Pods on it are real containers made from
images built here (hack/build-images.sh) and imported into containerd, never pulled.

    node = RealNode(cluster, gpus=2).start()   # Ready, `nvidia.com/gpu: 2` allocatable
    node.create_pvc(ns, "ckpt")                # hostPath PV pre-bound to a claim
    node.container_pid(pod)                    # host PID of a pod's first container
    node.stop()

Choices (docs/TESTBED.md, "The real node"):
* containerd 1.6 and runc from Debian: installed in seconds rather than built; the kubelet
  falls back to its own cgroupDriver (cgroupfs) when containerd lacks the CRI RuntimeConfig
  call. `restrict_oom_score_adj` because this machine's root lacks CAP_SYS_RESOURCE (the
  sandbox's oom_score_adj -998 is refused otherwise).
* Networking: the CNI bridge plugin on bridge `ft-cni0` (10.244.0.0/24) with host-local IPAM,
  no masquerade and no route off the machine. The bridge's own address 10.244.0.1 is the
  node's InternalIP (the kubelet refuses loopback), so the API server reaches the kubelet
  and the operator scrapes pod IPs on this machine only.
* Cluster DNS: CoreDNS on 10.244.0.1:53 serving cluster.local only (clusterdns.py), the
  kubelet's clusterDNS, so pods resolve `<hostname>.<subdomain>` of a headless Service.
* GPUs: bin/fake-gpu-plugin registers `nvidia.com/gpu` through the kubelet's device-plugin
  socket, the way NVIDIA's plugin does (the socket path is fixed by the kubelet:
  /var/lib/kubelet/device-plugins/kubelet.sock, hence one real node per machine).
* The pause image is our own static program (bin/pause) in a FROM-scratch image.
* containerd's content store lives in a cache directory, so an unchanged image is not
  imported again by the next run (the podman image ID is recorded per reference)."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import yaml

from .clusterdns import DOMAIN, start_coredns
from .kuberaw import ApiError, Kube
from .pki import REAL_NODE_IP, REAL_NODE_NAME
from .procs import Proc, free_port, wait_for

if TYPE_CHECKING:
    from .cluster import LocalCluster

log = logging.getLogger("finetune_testbed.realnode")

BRIDGE = "ft-cni0"
POD_CIDR = "10.244.0.0/24"
TAINT_KEY = "finetune.dev/real-node"
LABEL = "finetune.dev/real-node"
PV_LABEL = "finetune.dev/real-node-pv"
PAUSE_IMAGE = "localhost/finetune-pause:1"
TRAINER_IMAGE = os.environ.get("TRAINER_IMG", "localhost/finetune-trainer:dev")
OPERATOR_IMAGE = os.environ.get("OPERATOR_IMG", "localhost/finetune-operator:dev")
PLUGIN_DIR = Path("/var/lib/kubelet/device-plugins")
CNI_BIN = Path("/usr/lib/cni")
CACHE = Path(os.environ.get("FINETUNE_NODE_CACHE",
                            Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                            / "finetune-node"))
# The uid of the trainer image's user: claim directories are handed to it.
TRAINER_UID = 1000


def say(msg: str) -> None:
    print(f"[realnode {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(*argv: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): "
                           f"{(res.stderr or res.stdout).strip()[-2000:]}")
    return res


@contextlib.contextmanager
def heartbeat(what: str, archive: Path, every: float = 30.0):
    """A line every `every` seconds while a long step runs (no silent minutes)."""
    done, t0 = threading.Event(), time.monotonic()

    def beat():
        while not done.wait(every):
            size = archive.stat().st_size / 2**20 if archive.exists() else 0.0
            say(f"{what}: still running, {time.monotonic() - t0:.0f}s, archive {size:.0f} MiB")
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _ours(path: str) -> bool:
    """A path of some test-bed node: a default workdir (/tmp/ftnode-*) or one under .state/."""
    return "/ftnode-" in path or "/.state/" in path


def missing_tools() -> list[str]:
    needed = ["containerd", "ctr", "runc", "podman", "ip"]
    return [t for t in needed if shutil.which(t) is None] + \
        [f"{CNI_BIN}/{p}" for p in ("bridge", "host-local", "loopback") if not (CNI_BIN / p).exists()]


class RealNode:
    """kubelet + containerd + device plugin as child processes of the caller (they die with
    it); a second start on this machine waits for the first node to stop (file lock)."""

    def __init__(self, cluster: LocalCluster, gpus: int = 2, workdir: Path | None = None,
                 images: tuple[str, ...] = (TRAINER_IMAGE,), fresh: bool = False):
        self.cluster = cluster
        self.name, self.ip, self.gpus = REAL_NODE_NAME, REAL_NODE_IP, gpus
        # Unix socket paths are limited to 108 bytes: keep the directory short.
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="ftnode-", dir="/tmp")).resolve()
        self.images = images
        self.fresh = fresh  # empty a reused workdir (after unmounting what a killed run left)
        self.procs: dict[str, Proc] = {}
        self._lock: TextIO | None = None  # flock held from start() to stop()
        self._kube: Kube | None = None
        self.startup_seconds: float | None = None

    # ---- paths ---------------------------------------------------------------------------
    @property
    def sock(self) -> Path:
        return self.workdir / "containerd.sock"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def kube(self) -> Kube:
        if self._kube is None:
            self._kube = Kube(self.cluster.kubeconfig)
        return self._kube

    def pvc_dir(self, ns: str, claim: str) -> Path:
        return self.workdir / "pvc" / ns / claim

    def uri_dir(self, ns: str, uri: str) -> Path | None:
        """A status path `pvc://<claim>/<path>` as a directory on this node (None: not one)."""
        from finetune_operator.storage import split_claim_uri
        split = split_claim_uri(uri)
        return None if split is None else self.pvc_dir(ns, split[0]) / split[1]

    def ctr(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return run("ctr", "--address", str(self.sock), "-n", "k8s.io", *args, **kw)

    # ---- start ---------------------------------------------------------------------------
    def start(self, timeout: float = 180) -> RealNode:
        t0 = time.monotonic()
        missing = missing_tools()
        if missing:
            raise RuntimeError(f"the real node needs {', '.join(missing)}: "
                               "run `bash hack/install-tools.sh node` (Debian packages)")
        CACHE.mkdir(parents=True, exist_ok=True)
        self._lock = open(CACHE / "node.lock", "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # one real node per machine (fixed plugin socket)
        try:
            self._sweep_leftovers()
            if self.fresh:
                shutil.rmtree(self.workdir, ignore_errors=True)
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._bridge()
            self.procs["coredns"] = start_coredns(self.cluster.bin_dir, self.workdir,
                                                  self.log_dir, self.ip, self.cluster.kubeconfig)
            self._start_containerd()
            self._import_images()
            self._start_kubelet()
            self._start_device_plugin()
            wait_for(self.ready, timeout, f"real node {self.name} Ready with {self.gpus} GPUs",
                     interval=0.5, procs=list(self.procs.values()))
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        say(f"node {self.name} Ready in {self.startup_seconds:.1f}s (containerd, kubelet, "
            f"{self.gpus} x nvidia.com/gpu, CoreDNS); logs in {self.log_dir}")
        return self

    def _sweep_leftovers(self) -> None:
        """What a killed earlier run left (we hold the node lock, so no other real node is
        alive): container shims outlive containerd and keep their containers running; mounts
        and network namespaces outlive the kubelet; the bridge and plugin sockets remain."""
        import psutil
        for shim in psutil.process_iter(["name", "cmdline"]):
            argv = shim.info["cmdline"] or []
            if shim.info["name"] == "containerd-shim-runc-v2" and "-address" in argv and \
                    _ours(argv[argv.index("-address") + 1] if argv[-1] != "-address" else ""):
                say(f"stopping a container shim left by an earlier run (pid {shim.pid})")
                for proc in [*shim.children(recursive=True), shim]:
                    with contextlib.suppress(psutil.Error):
                        proc.kill()
        self._unmount_all(everything_ours=True)
        run("ip", "link", "del", BRIDGE, check=False)
        if PLUGIN_DIR.is_dir():
            for sock in PLUGIN_DIR.glob("*.sock"):
                sock.unlink(missing_ok=True)

    def _bridge(self) -> None:
        run("ip", "link", "add", "name", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{self.ip}/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        conf_dir = self.workdir / "cni" / "net.d"
        conf_dir.mkdir(parents=True, exist_ok=True)
        (conf_dir / "10-finetune.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "finetune",
            "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False,
                 "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR,
                                                             "gateway": self.ip}]],
                          "dataDir": str(self.workdir / "cni" / "ipam")}},
                {"type": "loopback"},
            ]}, indent=2))

    def _containerd_config(self) -> Path:
        root = CACHE / "containerd"
        state = self.workdir / "containerd-state"
        cfg = f"""version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.workdir / 'containerd-ttrpc.sock'}"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{CACHE / 'opt'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{shutil.which('runc')}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{self.workdir / 'cni' / 'net.d'}"
"""
        path = self.workdir / "containerd.toml"
        path.write_text(cfg)
        return path

    def _start_containerd(self) -> None:
        proc = Proc("containerd", ["containerd", "--config", str(self._containerd_config())],
                    self.log_dir)
        self.procs["containerd"] = proc
        proc.start()
        wait_for(lambda: self.ctr("version", check=False).returncode == 0, 60,
                 "containerd socket", procs=[proc])

    # ---- images --------------------------------------------------------------------------
    def _podman_id(self, ref: str) -> str | None:
        res = run("podman", "image", "inspect", "--format", "{{.Id}}", ref, check=False)
        return res.stdout.strip() or None

    def _pause_image(self) -> None:
        """FROM scratch + our static pause program: nothing to pull."""
        binary = self.cluster.bin_dir / "pause"
        ctx = self.workdir / "pause-image"
        ctx.mkdir(exist_ok=True)
        shutil.copy2(binary.resolve(), ctx / "pause")
        (ctx / "Containerfile").write_text(
            'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n')
        run("podman", "build", "--quiet", "-t", PAUSE_IMAGE, str(ctx))

    def _import_images(self) -> None:
        self._pause_image()
        marks = CACHE / "imported"
        marks.mkdir(exist_ok=True)
        for ref in (PAUSE_IMAGE, *self.images):
            image_id = self._podman_id(ref)
            if image_id is None:
                raise RuntimeError(f"image {ref} is not built: run `make images` "
                                   "(hack/build-images.sh)")
            mark = marks / hashlib.sha1(ref.encode()).hexdigest()
            present = self.ctr("images", "check", f"name=={ref}", check=False).stdout
            if mark.exists() and mark.read_text() == image_id and ref in present:
                continue
            t0 = time.monotonic()
            say(f"importing {ref} into containerd (podman save | ctr import; the trainer "
                "image is ~5 GB: minutes, progress every 30 s)")
            archive = self.workdir / "image.tar"
            with heartbeat(f"importing {ref}", archive):
                run("podman", "save", "--format", "docker-archive", "-o", str(archive), ref,
                    timeout=1200)
                self.ctr("images", "import", str(archive), timeout=1200)
            archive.unlink()
            mark.write_text(image_id)
            say(f"imported {ref} in {time.monotonic() - t0:.0f}s")

    # ---- kubelet -------------------------------------------------------------------------
    def _start_kubelet(self) -> None:
        p = self.cluster.pki
        kubeconfig = self.workdir / "kubelet.kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "node",
            "clusters": [{"name": "local", "cluster": {
                "server": self.cluster.server, "certificate-authority": str(p.ca_cert)}}],
            "users": [{"name": "node", "user": {"client-certificate": str(p.node_cert),
                                                "client-key": str(p.node_key)}}],
            "contexts": [{"name": "node", "context": {"cluster": "local", "user": "node"}}],
        }))
        config = self.workdir / "kubelet.yaml"
        config.write_text(yaml.safe_dump({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            # This machine has hybrid cgroups (v1 controllers) and no systemd.
            "failCgroupV1": False, "cgroupDriver": "cgroupfs", "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.sock}",
            "address": self.ip, "port": 10250, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": free_port(),
            "tlsCertFile": str(p.kubelet_serving_cert),
            "tlsPrivateKeyFile": str(p.kubelet_serving_key),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                               "x509": {"clientCAFile": str(p.ca_cert)}},
            "authorization": {"mode": "AlwaysAllow"},
            "resolvConf": "", "podLogsDir": str(self.workdir / "pod-logs"),
            # ClusterFirst pods ask our CoreDNS, with `<ns>.svc.cluster.local` as search path.
            "clusterDNS": [self.ip], "clusterDomain": DOMAIN,
            # This machine's disk is shared and often past the default thresholds: only a
            # truly full disk or memory may evict (tests inject evictions themselves).
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "localStorageCapacityIsolation": False, "serializeImagePulls": False,
            "maxPods": 32, "shutdownGracePeriod": "0s",
            "nodeStatusUpdateFrequency": "4s", "syncFrequency": "10s",
        }))
        self.procs["kubelet"] = proc = Proc("kubelet", [
            str(self.cluster.bin_dir / "kubelet"), f"--config={config}",
            f"--kubeconfig={kubeconfig}", f"--root-dir={self.workdir / 'kubelet'}",
            f"--cert-dir={self.workdir / 'kubelet-pki'}", f"--hostname-override={self.name}",
            f"--node-ip={self.ip}", f"--node-labels={LABEL}=true",
            f"--register-with-taints={TAINT_KEY}=true:NoSchedule", "--v=1",
        ], self.log_dir)
        proc.start()

    def _start_device_plugin(self) -> None:
        PLUGIN_DIR.mkdir(parents=True, exist_ok=True)
        wait_for(lambda: (PLUGIN_DIR / "kubelet.sock").exists(), 90,
                 "the kubelet's device-plugin socket", procs=[self.procs["kubelet"]])
        self.procs["fake-gpu-plugin"] = proc = Proc("fake-gpu-plugin", [
            str(self.cluster.bin_dir / "fake-gpu-plugin"), f"--plugin-dir={PLUGIN_DIR}",
            f"--count={self.gpus}"], self.log_dir)
        proc.start()

    def ready(self) -> bool:
        node = self.kube.get(f"/api/v1/nodes/{self.name}", timeout=5)
        conds = {c["type"]: c for c in node.get("status", {}).get("conditions") or []}
        return conds.get("Ready", {}).get("status") == "True" and \
            node["status"].get("allocatable", {}).get("nvidia.com/gpu") == str(self.gpus)

    # ---- pods ----------------------------------------------------------------------------
    def container_pid(self, container_id: str) -> int:
        """Host PID of a container from its status containerID (`containerd://<id>`)."""
        cid = container_id.split("://", 1)[1]
        pid_file = self.workdir / "containerd-state" / "io.containerd.runtime.v2.task" / \
            "k8s.io" / cid / "init.pid"
        return int(pid_file.read_text())

    def create_pvc(self, ns: str, claim: str, size: str = "1Gi", path: Path | None = None) -> Path:
        """A PersistentVolume pre-bound to a new claim: hostPath `path` (an existing directory)
        or, by default, a new pvc_dir owned by the trainer's uid. Returns the directory."""
        if path is None:
            path = self.pvc_dir(ns, claim)
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, TRAINER_UID, TRAINER_UID)
            # The kubelet creates a subPath's directories as root with the volume root's mode;
            # setgid + group-writable lets the trainer's group write there, as fsGroup does
            # on volume types that support it (hostPath does not).
            path.chmod(0o2775)
        digest = hashlib.sha1(f"{ns}/{claim}".encode()).hexdigest()[:8]
        pv_name = f"{self.name}-{ns}-{claim}"[:200] + f"-{digest}"
        pv = {"apiVersion": "v1", "kind": "PersistentVolume",
              "metadata": {"name": pv_name, "labels": {PV_LABEL: self.name}},
              "spec": {"capacity": {"storage": size}, "accessModes": ["ReadWriteOnce"],
                       "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                       "hostPath": {"path": str(path), "type": "Directory"},
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

    # ---- stop ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Stops the node like a power-off and leaves nothing running or mounted."""
        for name in ("fake-gpu-plugin", "kubelet", "coredns"):
            if name in self.procs:
                self.procs[name].stop()
        if "containerd" in self.procs and self.procs["containerd"].running():
            tasks = self.ctr("tasks", "ls", "-q", check=False).stdout.split()
            for task in tasks:
                self.ctr("tasks", "kill", "-s", "SIGKILL", "--all", task, check=False)
            for task in tasks:
                self.ctr("tasks", "delete", "--force", task, check=False)
            # The content store outlives the node: containers left in it would pin the
            # snapshots of images replaced since (containerd collects the rest on start).
            containers = self.ctr("containers", "ls", "-q", check=False).stdout.split()
            if containers:
                self.ctr("containers", "rm", *containers, check=False)
            self.procs["containerd"].stop()
        self._unmount_all()
        run("ip", "link", "del", BRIDGE, check=False)
        self._delete_api_objects()
        if self._kube:
            self._kube.close()
            self._kube = None
        if self._lock:
            self._lock.close()
            self._lock = None

    def _unmount_all(self, everything_ours: bool = False) -> None:
        """Volume, netns and rootfs mounts under this node's directories (with
        `everything_ours`, under any test-bed node's), deepest first."""
        roots = (str(self.workdir), str(CACHE / "containerd"), "/run/netns/cni-", "/var/run/netns/cni-")
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        stale = {m for m in mounts if m.startswith(roots) or (everything_ours and _ours(m))}
        for target in sorted(stale, key=len, reverse=True):
            run("umount", "-l", target, check=False)
        for ns_file in list(Path("/run/netns").glob("cni-*")) if Path("/run/netns").is_dir() else []:
            ns_file.unlink(missing_ok=True)

    def _delete_api_objects(self) -> None:
        try:
            self.kube.request("DELETE", f"/api/v1/nodes/{self.name}")
        except (ApiError, OSError) as exc:
            log.info("deleting node %s: %s", self.name, exc)
        try:
            pvs = self.kube.get("/api/v1/persistentvolumes",
                                query={"labelSelector": f"{PV_LABEL}={self.name}"})
            for pv in pvs.get("items") or []:
                self.kube.request("DELETE", f"/api/v1/persistentvolumes/{pv['metadata']['name']}")
        except (ApiError, OSError) as exc:
            log.info("deleting the node's PVs: %s", exc)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RealNode:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()
