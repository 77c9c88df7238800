"""The Helm chart charts/finetune-operator: generated from deploy/ (hack/gen-chart.py) and
rendering deploy/ with its default values, `helm lint` clean, and rendering what changed values
ask for. Helm is built from its Go module (hack/build/helm) by hack/build-binaries.sh."""
from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from static_support import ROOT, find, kustomize_build, one, run

CHART = ROOT / "charts" / "finetune-operator"
NAMESPACE = "finetune-system"
RELEASE = "finetune"
HELM_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/instance",
               "app.kubernetes.io/version")
ALL_MONITORING = ["--set", "monitoring.serviceMonitor.enabled=true",
                  "--set", "monitoring.podMonitor.enabled=true",
                  "--set", "monitoring.prometheusRule.enabled=true",
                  "--set", "monitoring.dashboard.enabled=true"]
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"}
VERSION = tomllib.loads((ROOT / "operator/pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def helm(tmp_path_factory) -> list[str]:
    out = run(["bash", str(ROOT / "hack/build-binaries.sh"), "tools"], timeout=3600).stdout
    binary = Path(out.strip().splitlines()[-1]) / "helm"
    assert binary.is_file(), f"hack/build-binaries.sh tools did not build {binary}"
    return [str(binary)]


@pytest.fixture(scope="module")
def helm_env(tmp_path_factory) -> dict[str, str]:
    """Helm's cache, config and data in a temporary directory, not the user's."""
    home = tmp_path_factory.mktemp("helm-home")
    return {"HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"), "PATH": "/usr/bin:/bin", "HOME": str(home)}


def template(helm: list[str], env: dict[str, str], *args: str) -> list[dict[str, Any]]:
    text = run([*helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args],
               env=env, timeout=120).stdout
    return [d for d in yaml.safe_load_all(text) if d]


def deployment_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = one(objects, "Deployment", "finetune-operator")["spec"]["template"]["spec"]["containers"]
    return container


def without_helm_labels(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "CustomResourceDefinition":
        return obj  # from crds/: never templated, so deploy/'s labels only
    labels = obj["metadata"].get("labels", {})
    for key in HELM_LABELS:
        assert key in labels, f"{obj['kind']}/{obj['metadata']['name']} lacks the label {key}"
        del labels[key]
    return obj


def key(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"


def test_chart_files_are_those_gen_chart_writes():
    proc = run([sys.executable, str(ROOT / "hack/gen-chart.py"), "--check"], check=False)
    assert proc.returncode == 0, f"chart and deploy/ drifted (run make manifests):\n{proc.stderr}"


def test_default_values_render_deploy(helm, helm_env, kubectl):
    """The drift test on the rendered objects: `helm template` with the default values (and
    every monitoring object on) is `kubectl kustomize` of deploy/ and deploy/monitoring/,
    but for the Helm labels and the Namespace (Helm installs into an existing namespace)."""
    chart = {key(o): without_helm_labels(o)
             for o in template(helm, helm_env, "--include-crds", *ALL_MONITORING)}
    deploy = {key(o): o for o in kustomize_build(kubectl, ROOT / "deploy")[1]
              + kustomize_build(kubectl, ROOT / "deploy/monitoring")[1] if o["kind"] != "Namespace"}
    assert sorted(chart) == sorted(deploy)
    differing = [k for k in deploy if chart[k] != deploy[k]]
    assert not differing, "\n".join(
        f"{k}:\n chart:  {json.dumps(chart[k], sort_keys=True)[:3000]}\n"
        f" deploy: {json.dumps(deploy[k], sort_keys=True)[:3000]}" for k in differing)


def test_chart_version_and_image_tag_are_the_operator_version(helm, helm_env):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == VERSION
    objects = template(helm, helm_env)
    assert deployment_container(objects)["image"] == f"ghcr.io/finetune-dev/finetune-operator:{VERSION}"
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/version"] == VERSION, key(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE, key(obj)
    # Optional objects are off by default: deploy/monitoring/ needs the Prometheus Operator.
    assert not [o for o in objects if o["kind"] in MONITORING_KINDS]


@pytest.mark.parametrize("values", [[], ALL_MONITORING])
def test_helm_lint_strict(helm, helm_env, values):
    proc = run([*helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, *values],
               env=helm_env, timeout=120)
    assert "0 chart(s) failed" in proc.stdout, proc.stdout


def test_changed_values_render_what_they_say(helm, helm_env, tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({
        "image": {"repository": "registry.example/ft/operator", "tag": "9.9.9", "pullPolicy": "IfNotPresent"},
        "replicas": 3,
        "watchNamespaces": ["team-a", "team-b"],
        "extraArgs": ["--log-level=DEBUG"],
        "extraEnv": [{"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"}],
        "metrics": {"port": 18080}, "health": {"port": 18081},
        "resources": {"requests": {"cpu": "250m", "memory": "300Mi"}},
        "nodeSelector": {"pool": "system"},
        "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": None,  # null drops a default (Helm merges maps with the defaults)
        "hostNetwork": True,
        "podDisruptionBudget": {"enabled": False},
        "monitoring": {"labels": {"release": "kube-prometheus-stack"},
                       "serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
    }))
    objects = template(helm, helm_env, "--values", str(values))
    deployment = one(objects, "Deployment", "finetune-operator")
    pod = deployment["spec"]["template"]["spec"]
    container = deployment_container(objects)
    assert deployment["spec"]["replicas"] == 3
    assert container["image"] == "registry.example/ft/operator:9.9.9"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["args"] == [
        "--leader-elect", "--leader-election-namespace=$(POD_NAMESPACE)",
        "--leader-election-id=finetune-operator-leader", "--metrics-port=18080",
        "--health-port=18081", "--namespace=team-a", "--namespace=team-b", "--log-level=DEBUG"]
    assert [p["containerPort"] for p in container["ports"]] == [18080, 18081]
    assert {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"} in container["env"]
    # Merged with the defaults: the limits stay.
    assert container["resources"] == {"requests": {"cpu": "250m", "memory": "300Mi"},
                                      "limits": {"cpu": "1", "memory": "1Gi"}}
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", "pool": "system"}
    assert "affinity" not in pod
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    # Namespace scope: RoleBindings in the watched namespaces instead of the ClusterRoleBinding
    # of the namespaced rights; the read-only cluster rights stay cluster-wide.
    assert not find(objects, "ClusterRoleBinding", "finetune-operator")
    one(objects, "ClusterRoleBinding", "finetune-operator-cluster")
    bindings = find(objects, "RoleBinding", "finetune-operator")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                      "name": "finetune-operator"}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "finetune-operator",
                                        "namespace": NAMESPACE}]
    assert not find(objects, "PodDisruptionBudget")
    one(objects, "NetworkPolicy", "finetune-operator")
    # Monitoring: only what was switched on, with the extra labels.
    assert sorted(o["kind"] for o in objects if o["kind"] in MONITORING_KINDS) == \
        ["PrometheusRule", "ServiceMonitor"]
    for obj in objects:
        if obj["kind"] in MONITORING_KINDS:
            assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack", key(obj)
            assert obj["metadata"]["namespace"] == NAMESPACE


def test_digest_replaces_the_tag_and_leader_election_can_be_off_with_one_replica(helm, helm_env):
    digest = "sha256:" + "ab" * 32
    objects = template(helm, helm_env, "--set", f"image.digest={digest}",
                       "--set", "replicas=1", "--set", "leaderElection.enabled=false")
    container = deployment_container(objects)
    assert container["image"] == f"ghcr.io/finetune-dev/finetune-operator@{digest}"
    assert container["args"] == ["--metrics-port=8080", "--health-port=8081"]


def test_two_replicas_without_leader_election_are_refused(helm, helm_env):
    proc = run([*helm, "template", RELEASE, str(CHART), "--set", "leaderElection.enabled=false"],
               env=helm_env, check=False, timeout=120)
    assert proc.returncode != 0
    assert "replicas > 1 needs leaderElection.enabled=true" in proc.stderr, proc.stderr


def test_crd_is_plain_yaml_in_crds():
    """Helm installs crds/ as it is, never templated (charts/finetune-operator/README.md): no
    template syntax may be there. Its content is deploy/'s (test_default_values_render_deploy)."""
    (crd_file,) = (CHART / "crds").glob("*.yaml")
    crd = yaml.safe_load(crd_file.read_text())
    assert crd["metadata"]["name"] == "trainingjobs.finetune.dev"
    assert "{{" not in crd_file.read_text()


@pytest.mark.parametrize(("flag", "value", "error"), [
    ("--set", "replica=3", "additional properties 'replica' not allowed"),
    ("--set", "image.digest=latest", "at '/image/digest': 'latest' does not match"),
    ("--set-json", 'watchNamespaces=["Team_A"]', "at '/watchNamespaces/0'"),
    ("--set", "monitoring.serviceMonitor.enable=true", "additional properties 'enable' not allowed"),
])
def test_values_schema_names_the_bad_field(helm, helm_env, flag, value, error):
    """values.schema.json: a misspelt or malformed value fails the install, naming the field."""
    proc = run([*helm, "template", RELEASE, str(CHART), flag, value], env=helm_env, check=False,
               timeout=120)
    assert proc.returncode != 0 and error in proc.stderr, proc.stderr
