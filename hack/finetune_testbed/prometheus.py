"""A real Prometheus server for integration tests, plus a fake trainer metrics endpoint.

`PrometheusServer` runs the Debian `prometheus` binary on 127.0.0.1 (free port, temporary
storage, short scrape and rule-evaluation intervals) and answers PromQL over the HTTP API.

The scrape configs are derived from the shipped Prometheus Operator objects
(deploy/monitoring/servicemonitor.yaml, podmonitor.yaml) the way the Prometheus Operator
renders them: the target carries the `__meta_kubernetes_*` labels that Kubernetes service
discovery would attach, and the relabelings (the operator's standard ones plus the monitor's
own `relabelings`) and `honorLabels` are applied by Prometheus itself. So the series look as
they will in a cluster (`namespace`, `pod`, `job`, `trainingjob`, `attempt`, ...), and a
setting in the shipped monitors that breaks the dashboard or the alerts breaks the test.

`FakeTrainer` serves the trainer's metrics (docs/CONTRACTS.md, "Trainer contract") on
(ip, 9400); bound to a simulated pod's loopback IP (kwok hands out 127.64.0.0/16), it is
read both by the operator (status.progress) and by Prometheus.

    prom = PrometheusServer(workdir, log_dir, rule_files=[RULES],
                            scrape_configs=[operator_scrape_config(sm, op.metrics_url, pod="op-0")])
    with prom:
        prom.wait_target_up("finetune-operator")
        prom.query("sum(finetune_operator_jobs)")      # -> list of {"metric", "value"}
"""
from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests
import yaml

from .procs import Proc, free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "monitoring"
RULES_FILE = MONITORING / "rules.yaml"
SERVICEMONITOR_FILE = MONITORING / "servicemonitor.yaml"
PODMONITOR_FILE = MONITORING / "podmonitor.yaml"
OPERATOR_NAMESPACE = "finetune-system"


class PromQLError(Exception):
    """The Prometheus HTTP API answered with status "error" (bad_data: a parse error...)."""

    def __init__(self, expr: str, error_type: str, error: str):
        self.expr, self.error_type, self.error = expr, error_type, error
        super().__init__(f"{error_type}: {error} (query: {expr})")


def prometheus_binary() -> str:
    """The `prometheus` binary, installed by hack/install-tools.sh (Debian package) if missing."""
    path = shutil.which("prometheus")
    if path:
        return path
    out = subprocess.run(["bash", str(REPO / "hack" / "install-tools.sh"), "promtool"],
                         check=True, capture_output=True, text=True, timeout=900).stdout
    for line in out.splitlines():
        name, _, p = line.partition(" ")
        if name == "prometheus" and p:
            return p
    raise RuntimeError("hack/install-tools.sh promtool did not provide the prometheus binary")


# ---- scrape configs from the shipped Prometheus Operator objects --------------------------

def _relabel(rule: dict) -> dict:
    """A Prometheus Operator RelabelConfig (camelCase) as a Prometheus relabel_config."""
    keys = {"sourceLabels": "source_labels", "targetLabel": "target_label", "regex": "regex",
            "replacement": "replacement", "separator": "separator", "modulus": "modulus",
            "action": "action"}
    out = {}
    for k, v in rule.items():
        if k not in keys:
            raise ValueError(f"relabeling key {k!r} not supported by this translation")
        out[keys[k]] = v.lower() if k == "action" else v
    return out


def _meta_relabels(target_labels: dict[str, str]) -> list[dict]:
    return [{"source_labels": [src], "target_label": dst} for src, dst in target_labels.items()]


def operator_scrape_config(metrics_url: str, *, pod: str, servicemonitor: dict | None = None,
                           namespace: str = OPERATOR_NAMESPACE, container: str = "operator",
                           interval: str = "1s") -> dict:
    """What the Prometheus Operator generates for the ServiceMonitor, one static target
    (the operator process at metrics_url) standing in for one endpoint of the Service."""
    sm = servicemonitor or yaml.safe_load(SERVICEMONITOR_FILE.read_text())
    ep = sm["spec"]["endpoints"][0]
    service = sm["metadata"]["name"]  # the Service has the same name (deploy/manager/service.yaml)
    url = urlparse(metrics_url)
    meta = {"__meta_kubernetes_namespace": namespace, "__meta_kubernetes_service_name": service,
            "__meta_kubernetes_pod_name": pod, "__meta_kubernetes_pod_container_name": container,
            "__meta_kubernetes_endpoint_port_name": ep.get("port", "")}
    relabels = _meta_relabels({"__meta_kubernetes_namespace": "namespace",
                               "__meta_kubernetes_service_name": "service",
                               "__meta_kubernetes_pod_name": "pod",
                               "__meta_kubernetes_pod_container_name": "container"})
    # job: the Service name (no jobLabel set); endpoint: the port name.
    relabels += [{"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
                 {"target_label": "endpoint", "replacement": ep.get("port", "")}]
    relabels += [_relabel(r) for r in ep.get("relabelings", []) or []]
    return {
        "job_name": f"serviceMonitor/{namespace}/{sm['metadata']['name']}/0",
        "honor_labels": bool(ep.get("honorLabels", False)),
        "scrape_interval": interval, "scrape_timeout": interval,
        "metrics_path": url.path or ep.get("path", "/metrics"),
        "static_configs": [{"targets": [url.netloc], "labels": meta}],
        "relabel_configs": relabels,
        "metric_relabel_configs": [_relabel(r) for r in ep.get("metricRelabelings", []) or []],
    }


def trainer_scrape_config(sd_file: Path, *, podmonitor: dict | None = None,
                          namespace: str = OPERATOR_NAMESPACE, interval: str = "1s") -> dict:
    """What the Prometheus Operator generates for the PodMonitor; targets come from a
    file_sd file (`write_trainer_targets`) carrying the Kubernetes pod meta labels."""
    pm = podmonitor or yaml.safe_load(PODMONITOR_FILE.read_text())
    ep = pm["spec"]["podMetricsEndpoints"][0]
    relabels = _meta_relabels({"__meta_kubernetes_namespace": "namespace",
                               "__meta_kubernetes_pod_container_name": "container",
                               "__meta_kubernetes_pod_name": "pod"})
    relabels += [{"target_label": "job", "replacement": f"{namespace}/{pm['metadata']['name']}"},
                 {"target_label": "endpoint", "replacement": ep.get("port", "")}]
    relabels += [_relabel(r) for r in ep.get("relabelings", []) or []]
    return {
        "job_name": f"podMonitor/{namespace}/{pm['metadata']['name']}/0",
        "honor_labels": bool(ep.get("honorLabels", False)),
        "scrape_interval": interval, "scrape_timeout": interval,
        "metrics_path": ep.get("path", "/metrics"),
        "file_sd_configs": [{"files": [str(sd_file)], "refresh_interval": "1s"}],
        "relabel_configs": relabels,
        "metric_relabel_configs": [_relabel(r) for r in ep.get("metricRelabelings", []) or []],
    }


def pod_target(pod: dict, port: int = 9400, container: str = "trainer",
               port_name: str = "metrics") -> dict:
    """A file_sd entry for a pod, with the meta labels Kubernetes pod discovery would set."""
    meta = pod["metadata"]
    labels = {"__meta_kubernetes_namespace": meta["namespace"],
              "__meta_kubernetes_pod_name": meta["name"],
              "__meta_kubernetes_pod_container_name": container,
              "__meta_kubernetes_pod_container_port_name": port_name,
              "__meta_kubernetes_pod_ip": pod["status"]["podIP"]}
    for key, value in (meta.get("labels") or {}).items():
        sanitized = "".join(c if c.isalnum() else "_" for c in key)
        labels[f"__meta_kubernetes_pod_label_{sanitized}"] = value
        labels[f"__meta_kubernetes_pod_labelpresent_{sanitized}"] = "true"
    return {"targets": [f"{pod['status']['podIP']}:{port}"], "labels": labels}


def write_trainer_targets(sd_file: Path, targets: list[dict]) -> None:
    tmp = sd_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(targets))
    tmp.replace(sd_file)  # atomic: Prometheus never reads half a file


# ---- the server -----------------------------------------------------------------------------

class PrometheusServer:
    def __init__(self, workdir: Path, log_dir: Path, *, scrape_configs: list[dict],
                 rule_files: Sequence[Path] = (), scrape_interval: str = "1s",
                 evaluation_interval: str = "1s", name: str = "prometheus"):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config_file = self.workdir / "prometheus.yml"
        self.config = {
            "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                       "evaluation_interval": evaluation_interval},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": list(scrape_configs),
        }
        self.proc = Proc(name, [
            prometheus_binary(), f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=2h", "--log.level=warn",
            "--web.enable-lifecycle",
        ], Path(log_dir))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> PrometheusServer:
        self.config_file.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.proc.start()
        wait_for(lambda: requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200,
                 timeout, "prometheus /-/ready", procs=[self.proc])
        return self

    def stop(self) -> None:
        self.proc.stop()

    def running(self) -> bool:
        return self.proc.running()

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- HTTP API ---------------------------------------------------------------------------
    def api(self, path: str, **params: Any) -> Any:
        resp = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = resp.json()
        if body.get("status") != "success":
            raise PromQLError(params.get("query", path), body.get("errorType", "?"),
                              body.get("error", resp.text[:300]))
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant query: the result vector ([{"metric": {...}, "value": [t, "v"]}, ...]).
        Raises PromQLError when Prometheus refuses the expression."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def value(self, expr: str) -> float | None:
        """The value of a one-series result, None when empty."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr}: {len(result)} series"
        return float(result[0]["value"][1])

    def rule_groups(self) -> list[dict]:
        return self.api("rules")["groups"]

    def targets(self) -> list[dict]:
        return self.api("targets", state="active")["activeTargets"]

    def wait_target_up(self, job: str, timeout: float = 60, count: int = 1) -> None:
        def up():
            targets = [t for t in self.targets() if t["labels"].get("job") == job]
            return len(targets) >= count and all(t["health"] == "up" for t in targets)
        wait_for(up, timeout, f"prometheus target job={job} up", interval=0.5, procs=[self.proc])

    def wait_query(self, expr: str, timeout: float = 60, what: str = "") -> list[dict]:
        """Until the query returns at least one series."""
        return wait_for(lambda: self.query(expr), timeout, what or f"series for {expr}",
                        interval=0.5, procs=[self.proc])

    def log_tail(self, lines: int = 40) -> str:
        return self.proc.log_tail(lines)


# ---- a fake trainer endpoint -----------------------------------------------------------------

class FakeTrainer:
    """Serves the finetune_trainer_* metrics (no labels, as the real trainer) on (ip, port);
    the test moves it along with advance()."""

    def __init__(self, ip: str = "127.0.0.1", port: int = 9400, total_steps: int = 100):
        self.step, self.total, self.loss, self.epoch = 0, total_steps, 3.0, 0.0
        self.checkpoint_step = 0
        self.eval_loss = float("nan")  # as the trainer: NaN until its first evaluation
        self.tokens_per_second = 0.0
        self.heartbeat = time.time()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = fake.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((ip, port), Handler)
        self.ip, self.port = ip, self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def render(self) -> str:
        rows = [("step", "gauge", self.step), ("total_steps", "gauge", self.total),
                ("epoch", "gauge", self.epoch), ("loss", "gauge", self.loss),
                ("eval_loss", "gauge", self.eval_loss),
                ("tokens_per_second", "gauge", self.tokens_per_second),
                ("last_checkpoint_step", "gauge", self.checkpoint_step),
                ("heartbeat_timestamp_seconds", "gauge", self.heartbeat)]
        out = []
        for name, kind, value in rows:
            out += [f"# TYPE finetune_trainer_{name} {kind}", f"finetune_trainer_{name} {value}"]
        return "\n".join(out) + "\n"

    def advance(self, step: int, loss: float, *, checkpoint_step: int | None = None) -> None:
        self.step, self.loss, self.heartbeat = step, loss, time.time()
        self.eval_loss = loss + 0.05  # an evaluation at every advance
        self.epoch = step / max(self.total, 1)
        self.tokens_per_second = 1234.5
        if checkpoint_step is not None:
            self.checkpoint_step = checkpoint_step

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
