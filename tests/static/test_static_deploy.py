"""deploy/ renders with kustomize and every object is well formed and hardened."""
from __future__ import annotations

import filecmp
import json
import re
import sys

import pytest
import yaml
from static_support import DEPLOY, MONITORING, OPERATOR_NAMESPACE, ROOT, one, run

DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
OPERATOR_SELECTOR = {"app.kubernetes.io/name": "finetune-operator", "app.kubernetes.io/component": "controller"}
# The flags of the deployment contract in docs/CONTRACTS.md ("Deployment contract").
EXPECTED_ARGS = [
    "--leader-elect",
    "--leader-election-namespace=$(POD_NAMESPACE)",
    "--leader-election-id=finetune-operator-leader",
    "--metrics-port=8080",
    "--health-port=8081",
]


def test_base_renders_the_expected_objects(base_objects):
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in base_objects)
    assert kinds == sorted([
        ("Namespace", "finetune-system"),
        ("CustomResourceDefinition", "trainingjobs.finetune.dev"),
        ("ServiceAccount", "finetune-operator"),
        ("ClusterRole", "finetune-operator"),
        ("ClusterRole", "finetune-operator-cluster"),
        ("ClusterRole", "finetune-trainingjobs-view"),
        ("ClusterRole", "finetune-trainingjobs-edit"),
        ("ClusterRoleBinding", "finetune-operator"),
        ("ClusterRoleBinding", "finetune-operator-cluster"),
        ("Role", "finetune-operator-leader-election"),
        ("RoleBinding", "finetune-operator-leader-election"),
        ("Deployment", "finetune-operator"),
        ("Service", "finetune-operator"),
        ("PodDisruptionBudget", "finetune-operator"),
        ("NetworkPolicy", "finetune-operator"),
        ("Lease", "finetune-operator-leader"),  # empty: deleting the manifests deletes it
    ])


def test_monitoring_renders_the_expected_objects(monitoring_objects):
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in monitoring_objects)
    assert kinds == sorted([
        ("ServiceMonitor", "finetune-operator"),
        ("PodMonitor", "finetune-trainer"),
        ("PrometheusRule", "finetune-operator"),
        ("ConfigMap", "finetune-dashboard"),
    ])


@pytest.mark.parametrize("which", ["base", "monitoring"])
def test_objects_are_well_formed(which, base_objects, monitoring_objects):
    objects = base_objects if which == "base" else monitoring_objects
    seen = set()
    for o in objects:
        where = f"{o.get('kind')}/{o.get('metadata', {}).get('name')}"
        assert isinstance(o.get("apiVersion"), str) and o["apiVersion"], where
        assert isinstance(o.get("kind"), str) and o["kind"], where
        meta = o["metadata"]
        assert DNS1123.match(meta["name"]) and len(meta["name"]) <= 253, where
        if o["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in meta, f"{where} is cluster-scoped but has a namespace"
        else:
            assert meta.get("namespace") == OPERATOR_NAMESPACE, where
        labels = meta.get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "finetune-operator", where
        for key, value in labels.items():
            assert isinstance(value, str) and len(value) <= 63, f"{where}: label {key}={value!r}"
        key = (o["apiVersion"].split("/")[0], o["kind"], meta.get("namespace"), meta["name"])
        assert key not in seen, f"duplicate object {where}"
        seen.add(key)


def test_rendered_yaml_roundtrips(base_render, monitoring_render):
    for text, objects in (base_render, monitoring_render):
        assert text.count("\n---\n") + 1 == len(objects)
        assert list(yaml.safe_load_all(yaml.safe_dump_all(objects))) == objects


def test_namespace_enforces_restricted_pod_security(base_objects):
    labels = one(base_objects, "Namespace", OPERATOR_NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


# --- CRD copy -------------------------------------------------------------------------

def test_crd_copy_in_deploy_is_identical_to_crds():
    generated = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert generated, "crds/ is empty: run `make manifests` (then hack/sync-crd.sh)"
    copied = sorted(p.name for p in (DEPLOY / "crd").glob("*.yaml") if p.name != "kustomization.yaml")
    assert copied == generated, "deploy/crd/ differs from crds/: run hack/sync-crd.sh"
    for name in generated:
        assert filecmp.cmp(ROOT / "crds" / name, DEPLOY / "crd" / name, shallow=False), \
            f"deploy/crd/{name} differs from crds/{name}: run hack/sync-crd.sh"
    listed = yaml.safe_load((DEPLOY / "crd/kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == generated


def test_rendered_crd_is_the_trainingjob_api(base_objects):
    crd = one(base_objects, "CustomResourceDefinition", "trainingjobs.finetune.dev")
    spec = crd["spec"]
    assert spec["group"] == "finetune.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["plural"] == "trainingjobs" and spec["names"]["kind"] == "TrainingJob"
    assert "tj" in spec["names"].get("shortNames", [])
    versions = {v["name"]: v for v in spec["versions"]}
    assert versions["v1alpha1"]["served"] and versions["v1alpha1"]["storage"]
    assert "status" in versions["v1alpha1"].get("subresources", {})


# --- Deployment -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def deployment(base_objects):
    return one(base_objects, "Deployment", "finetune-operator")


@pytest.fixture(scope="module")
def container(deployment):
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    return containers[0]


def test_deployment_runs_leader_and_standby(deployment):
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert spec["selector"]["matchLabels"] == OPERATOR_SELECTOR
    pod_labels = spec["template"]["metadata"]["labels"]
    assert OPERATOR_SELECTOR.items() <= pod_labels.items()


def test_deployment_passes_the_contract_flags_and_env(container):
    assert container["args"] == EXPECTED_ARGS
    assert "command" not in container, "the image ENTRYPOINT runs the operator"
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    contracts = (ROOT / "docs/CONTRACTS.md").read_text()
    for flag in EXPECTED_ARGS:
        assert flag.split("=")[0] in contracts, f"{flag} is not in docs/CONTRACTS.md"


def test_deployment_pod_security(deployment, container):
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "finetune-operator"
    assert pod["automountServiceAccountToken"] is True
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc.get("privileged") is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    for volume in pod.get("volumes", []):
        assert set(volume) - {"name"} <= {"emptyDir", "configMap", "projected", "secret", "downwardAPI"}, volume
        assert "hostPath" not in volume


def test_deployment_resources_and_probes(container):
    res = container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res[kind]), f"{kind} must set cpu and memory"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
    assert "/tmp" in mounts, "readOnlyRootFilesystem needs a writable /tmp"


def test_image_is_pinned_to_a_tag(container):
    image = container["image"]
    assert "@sha256:" in image or re.search(r":[\w.-]+$", image.split("/")[-1]), image
    assert not image.endswith(":latest")


def test_metrics_service_selects_the_operator(base_objects, deployment):
    svc = one(base_objects, "Service", "finetune-operator")
    assert svc["spec"]["selector"] == OPERATOR_SELECTOR
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]


def test_pdb_and_networkpolicy_select_the_operator(base_objects):
    pdb = one(base_objects, "PodDisruptionBudget", "finetune-operator")
    assert pdb["spec"]["selector"]["matchLabels"] == OPERATOR_SELECTOR
    assert pdb["spec"]["maxUnavailable"] == 1
    netpol = one(base_objects, "NetworkPolicy", "finetune-operator")
    assert netpol["spec"]["podSelector"]["matchLabels"] == OPERATOR_SELECTOR
    allowed = {p["port"] for rule in netpol["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == {"metrics", "health"}


# --- Monitoring -----------------------------------------------------------------------

def _selects(selector: dict, labels: dict) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
    return True


def test_servicemonitor_scrapes_the_metrics_port(base_objects, monitoring_objects):
    sm = one(monitoring_objects, "ServiceMonitor", "finetune-operator")
    svc = one(base_objects, "Service", "finetune-operator")
    assert _selects(sm["spec"]["selector"], svc["metadata"]["labels"])
    assert [(e["port"], e["path"]) for e in sm["spec"]["endpoints"]] == [("metrics", "/metrics")]
    assert "jobLabel" not in sm["spec"], "the alerts and README rely on job=<Service name>"


def test_podmonitor_selects_trainer_pods_not_the_operator(monitoring_objects, deployment):
    pm = one(monitoring_objects, "PodMonitor", "finetune-trainer")
    # Labels of a trainer pod (docs/CONTRACTS.md, "Pods").
    trainer_pod = {"finetune.dev/job-name": "demo", "finetune.dev/attempt": "1",
                   "app.kubernetes.io/managed-by": "finetune-operator"}
    assert _selects(pm["spec"]["selector"], trainer_pod)
    assert not _selects(pm["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    endpoints = pm["spec"]["podMetricsEndpoints"]
    assert [(e["port"], e["path"]) for e in endpoints] == [("metrics", "/metrics")]
    targets = {r["targetLabel"] for r in endpoints[0]["relabelings"]}
    assert {"trainingjob", "attempt"} <= targets


def test_prometheusrule_is_generated_from_rules_yaml(monitoring_objects):
    run([sys.executable, str(ROOT / "hack/gen-prometheusrule.py"), "--check"])
    rule = one(monitoring_objects, "PrometheusRule", "finetune-operator")
    source = yaml.safe_load((MONITORING / "rules.yaml").read_text())
    assert rule["spec"]["groups"] == source["groups"]


def test_dashboard_configmap_carries_the_dashboard(monitoring_objects):
    cm = one(monitoring_objects, "ConfigMap", "finetune-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert list(cm["data"]) == ["finetune.json"]
    assert json.loads(cm["data"]["finetune.json"]) == json.loads((MONITORING / "dashboard.json").read_text())


def test_monitoring_kustomization_does_not_ship_the_plain_rules_file():
    kust = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert "rules.yaml" not in kust["resources"]
