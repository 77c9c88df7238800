"""Kueue's manager on the local control plane (docs/TESTBED.md, "Kueue").

Built from its Go module by hack/build-binaries.sh (hack/build/kueue). Runs as a host process
with only the plain-pod integration, for namespaces labelled `MANAGED_LABEL` only, its webhooks
served over TLS from the harness PKI and registered with the API server as URLs on 127.0.0.1
(nothing here implements Service IPs). Its CRDs come from the module itself, so they always
match the binary."""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import requests
import yaml

from finetune_operator.core.kueue import ADMISSION_GATE, TERMINATION_TARGET

from .procs import Proc, free_port, wait_for

if TYPE_CHECKING:
    from .cluster import LocalCluster

HERE = Path(__file__).resolve().parent
WRAPPER = HERE.parent / "build" / "kueue"
MODULE = "sigs.k8s.io/kueue"
NAMESPACE = "kueue-system"  # Kueue's own namespace (its Configuration's `namespace`)
# Only namespaces with this label are managed: Kueue's pod webhook would otherwise gate (and,
# while Kueue is down, refuse) the pods of every test sharing the cluster.
MANAGED_LABEL = "finetune.dev/kueue"
MANAGED_VALUE = "enabled"
WEBHOOK_CONFIG_NAMES = ("finetune-testbed-kueue-mutating", "finetune-testbed-kueue-validating")
# The webhooks kept from Kueue's manifests: its own kinds and the plain pod (the other
# frameworks' kinds are not installed here, and their webhooks would catch Jobs cluster-wide).
_KEPT_PATH_PARTS = ("kueue-x-k8s-io", "--v1-pod")
# With internalCertManagement off, Kueue v0.17 loads a metrics serving cert from this fixed
# path at start-up and exits without it, even with metrics off (cmd/kueue/main.go). Any valid
# pair will do; the harness's serving cert is written there.
METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")


def module_dir() -> Path:
    """The pinned Kueue module's source in the Go module cache (downloaded if missing)."""
    version = next(line.split()[1] for line in (WRAPPER / "go.mod").read_text().splitlines()
                   if line.strip().startswith(MODULE + " "))
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
    out = subprocess.run(["go", "mod", "download", "-json", f"{MODULE}@{version}"], cwd=WRAPPER, env=env,
                         check=True, capture_output=True, text=True)
    return Path(json.loads(out.stdout)["Dir"])


def install_cert(cert: Path, key: Path, directory: Path) -> None:
    """tls.crt and tls.key in `directory`, each replaced atomically (another test session may
    be starting its Kueue from the same fixed directory). A directory this user may not create
    (METRICS_CERT_DIR as non-root, e.g. on a CI runner) is made ours with passwordless sudo."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        made = subprocess.run(["sudo", "-n", "install", "-d", "-o", str(os.getuid()), str(directory)],
                              capture_output=True, text=True) if shutil.which("sudo") else None
        if made is None or made.returncode != 0:
            raise RuntimeError(f"Kueue needs a serving certificate in {directory}, which this user may not "
                               f"create: {made.stderr.strip() if made else 'no sudo'}") from None
    try:
        for source, name in ((cert, "tls.crt"), (key, "tls.key")):
            tmp = directory / f".{name}.{os.getpid()}"
            shutil.copyfile(source, tmp)
            tmp.chmod(0o600)
            tmp.replace(directory / name)
    except OSError as exc:
        raise RuntimeError(f"Kueue needs a serving certificate in {directory}: {exc}") from None


def crds(source: Path, port: int, ca_pem: bytes) -> list[dict]:
    """Kueue's CRDs; those its kustomization gives a conversion webhook (v1beta1 <-> v1beta2)
    get it at https://127.0.0.1:<port>/convert."""
    crd_dir = source / "config" / "components" / "crd"
    kustomization = yaml.safe_load((crd_dir / "kustomization.yaml").read_text())
    converted = {yaml.safe_load((crd_dir / p["path"]).read_text())["metadata"]["name"]
                 for p in kustomization.get("patches") or [] if "webhook_in_" in p.get("path", "")}
    out = []
    for path in sorted((crd_dir / "bases").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if crd["metadata"]["name"] in converted:
            crd["spec"]["conversion"] = {"strategy": "Webhook", "webhook": {
                "clientConfig": {"url": f"https://127.0.0.1:{port}/convert",
                                 "caBundle": base64.b64encode(ca_pem).decode()},
                "conversionReviewVersions": ["v1"]}}
        out.append(crd)
    return out


def configuration(webhook_port: int, health_port: int, cert_dir: Path) -> dict:
    """Kueue's Configuration (config.kueue.x-k8s.io/v1beta2): plain pods only, test namespaces only."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},  # 0: off (controller-runtime)
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        # Our own serving cert instead of Kueue rotating one into a Secret of a Service.
        "internalCertManagement": {"enable": False},
        "managedJobsNamespaceSelector": {"matchLabels": {MANAGED_LABEL: MANAGED_VALUE}},
        "integrations": {"frameworks": ["pod"]},
    }


def webhook_configurations(source: Path, port: int, ca_pem: bytes) -> list[dict]:
    """Kueue's Mutating/ValidatingWebhookConfigurations, pointed at https://127.0.0.1:<port>."""
    docs = [d for d in yaml.safe_load_all((source / "config" / "components" / "webhook" / "manifests.yaml")
                                          .read_text()) if d]
    ca = base64.b64encode(ca_pem).decode()
    out = []
    for doc, name in zip(sorted(docs, key=lambda d: d["kind"] != "MutatingWebhookConfiguration"),
                         WEBHOOK_CONFIG_NAMES, strict=True):
        hooks = []
        for hook in doc["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            if not any(part in path for part in _KEPT_PATH_PARTS):
                continue
            hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca}
            if "--v1-pod" in path:
                hook["namespaceSelector"] = {"matchLabels": {MANAGED_LABEL: MANAGED_VALUE}}
            hooks.append(hook)
        out.append({"apiVersion": doc["apiVersion"], "kind": doc["kind"], "metadata": {"name": name},
                    "webhooks": hooks})
    return out


@dataclass
class Kueue:
    """A running Kueue manager on `cluster` (a started LocalCluster)."""

    cluster: LocalCluster
    proc: Proc | None = None
    webhook_port: int = 0
    health_port: int = 0

    def start(self, timeout: float = 120) -> Kueue:
        c = self.cluster
        source = module_dir()
        self.webhook_port, self.health_port = free_port(), free_port()
        ca_pem = c.pki.ca_cert.read_bytes()
        definitions = crds(source, self.webhook_port, ca_pem)
        c.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                  input=yaml.safe_dump_all(definitions))
        c.wait_established(*[d["metadata"]["name"] for d in definitions])
        c.kubectl("create", "namespace", NAMESPACE, check=False)
        workdir: Path = c.workdir / "kueue"
        cert_dir = workdir / "certs"
        cert_dir.mkdir(parents=True, exist_ok=True)
        # The API server's serving cert from the harness CA: it names 127.0.0.1, where the
        # webhook server listens too (the CA key is never written, so no new cert can be minted).
        for directory in (cert_dir, METRICS_CERT_DIR):
            install_cert(c.pki.serving_cert, c.pki.serving_key, directory)
        config_path = workdir / "config.yaml"
        config_path.write_text(yaml.safe_dump(configuration(self.webhook_port, self.health_port, cert_dir)))
        self.proc = Proc("kueue", [
            str(c.bin_dir / "kueue"), f"--config={config_path}",
            f"--kubeconfig={c.kubeconfig}",
            # The visibility API server would need an APIService and the aggregation layer.
            "--feature-gates=VisibilityOnDemand=false",
        ], c.log_dir)
        self.proc.start()
        c.procs["kueue"] = self.proc
        ready = f"http://127.0.0.1:{self.health_port}/readyz"
        wait_for(lambda: requests.get(ready, timeout=2).status_code == 200, timeout, "kueue /readyz",
                 procs=[self.proc])
        c.apply(webhook_configurations(source, self.webhook_port, ca_pem))
        # The webhooks answer once a ResourceFlavor passes them (a server-side dry run).
        probe = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor",
                 "metadata": {"name": "webhook-probe"}}
        wait_for(lambda: c.kubectl("apply", "--dry-run=server", "-f", "-",
                                   input=json.dumps(probe), check=False).returncode == 0,
                 timeout, "kueue webhooks answering", procs=[self.proc])
        return self

    def stop(self) -> None:
        """Stop the manager and unregister its webhooks (pods of labelled namespaces would be
        refused otherwise). CRDs and objects stay."""
        c = self.cluster
        c.kubectl("delete", f"mutatingwebhookconfiguration/{WEBHOOK_CONFIG_NAMES[0]}",
                  f"validatingwebhookconfiguration/{WEBHOOK_CONFIG_NAMES[1]}", "--ignore-not-found", check=False)
        if self.proc is not None:
            self.proc.stop()


def manage_namespace(cluster: LocalCluster, namespace: str) -> None:
    """Let Kueue manage the pods of `namespace`."""
    cluster.kubectl("label", "namespace", namespace, f"{MANAGED_LABEL}={MANAGED_VALUE}", "--overwrite")


# ---- queues and facts about Kueue's objects, shared by the tests that queue through it ----
API = "/apis/kueue.x-k8s.io/v1beta2"
QUEUE = "team-a"  # the LocalQueue
LOW, HIGH = "finetune-test-low", "finetune-test-high"  # WorkloadPriorityClasses


def queue_manifests(namespace: str, cluster_queue: str, gpus: int = 8) -> list[dict]:
    """The README's manifests ("Queueing with Kueue"), the ClusterQueue limited to `namespace`.
    The flavor has no nodeLabels, so Kueue adds no nodeSelector to the pods it admits."""
    return [
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "gpu"}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": cluster_queue},
         "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                  "queueingStrategy": "BestEffortFIFO",
                  "preemption": {"withinClusterQueue": "LowerPriority"},
                  "resourceGroups": [{"coveredResources": ["nvidia.com/gpu"], "flavors": [
                      {"name": "gpu", "resources": [{"name": "nvidia.com/gpu", "nominalQuota": gpus}]}]}]}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
         "metadata": {"name": QUEUE, "namespace": namespace}, "spec": {"clusterQueue": cluster_queue}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "WorkloadPriorityClass", "metadata": {"name": LOW},
         "value": 100, "description": "preemptible fine-tuning"},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "WorkloadPriorityClass", "metadata": {"name": HIGH},
         "value": 1000, "description": "urgent fine-tuning"},
    ]


def condition(obj: dict, type_: str) -> dict:
    """The condition `type_` of `obj` ({} when absent)."""
    return next((c for c in obj.get("status", {}).get("conditions") or [] if c["type"] == type_), {})


def open_queues(cluster: LocalCluster, namespace: str, gpus: int) -> str:
    """Kueue manages `namespace`, which gets `queue_manifests` with `gpus` of quota; returns the
    ClusterQueue's name once Kueue says it is Active."""
    manage_namespace(cluster, namespace)
    cluster_queue = f"cq-{namespace}"
    cluster.apply(queue_manifests(namespace, cluster_queue, gpus))
    wait_for(lambda: condition(cluster.get_json("clusterqueue", cluster_queue), "Active").get("status") == "True",
             60, f"ClusterQueue {cluster_queue} Active")
    return cluster_queue


def gated(pod: dict) -> bool:
    """Kueue still holds the pod back (its admission scheduling gate)."""
    return any(g.get("name") == ADMISSION_GATE for g in pod["spec"].get("schedulingGates") or [])


def evicted_by_kueue(pod: dict) -> bool:
    """Kueue stopped the pod's Workload (TerminationTarget=True; preemption or eviction)."""
    return condition(pod, TERMINATION_TARGET).get("status") == "True"
