"""Helpers for running the operator as someone other than the cluster admin, and for
reading what it reports: ServiceAccount token kubeconfigs, `kubectl auth can-i`, the
leader Lease, and single values from a Prometheus text exposition."""
from __future__ import annotations

import json
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families


def service_account_token(cluster, name: str, namespace: str, duration: str = "1h") -> str:
    """`kubectl create token` (TokenRequest API): a bound token for the ServiceAccount."""
    return cluster.kubectl("create", "token", name, "-n", namespace,
                           f"--duration={duration}").stdout.strip()


def token_kubeconfig(cluster, path: Path, token: str, user: str = "sa") -> Path:
    """A kubeconfig for the local cluster (server and CA from the admin kubeconfig) that
    authenticates with a bearer token."""
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    cluster_entry = admin["clusters"][0]
    cfg = {
        "apiVersion": "v1", "kind": "Config", "current-context": user,
        "clusters": [cluster_entry],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": cluster_entry["name"], "user": user,
                                                 "namespace": "default"}}],
    }
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)
    return path


def service_account_kubeconfig(cluster, path: Path, name: str, namespace: str) -> Path:
    return token_kubeconfig(cluster, path, service_account_token(cluster, name, namespace),
                            user=f"{namespace}-{name}")


def can_i(cluster, who: str, verb: str, resource: str, *, namespace: str | None = None,
          subresource: str | None = None) -> bool:
    """`kubectl auth can-i VERB RESOURCE --as=WHO` (resource may be `leases/<name>`);
    without a namespace the question is cluster-wide (all namespaces)."""
    cmd = ["auth", "can-i", verb, resource, f"--as={who}"]
    cmd += [f"--subresource={subresource}"] if subresource else []
    cmd += [f"--namespace={namespace}"] if namespace else ["--all-namespaces"]
    res = cluster.kubectl(*cmd, check=False)
    answer = res.stdout.strip()
    if answer not in ("yes", "no"):
        raise RuntimeError(f"kubectl {' '.join(cmd)}: {res.stdout} {res.stderr}")
    return answer == "yes"


def lease(cluster, namespace: str, name: str) -> dict | None:
    res = cluster.kubectl("get", "lease", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(res.stdout) if res.returncode == 0 else None


def lease_holder(cluster, namespace: str, name: str) -> str | None:
    obj = lease(cluster, namespace, name)
    return ((obj or {}).get("spec") or {}).get("holderIdentity") if obj else None


def metric_samples(text: str, name: str) -> list[tuple[dict, float]]:
    """All samples of one metric (sample name, e.g. `..._total`, `..._count`) as (labels, value)."""
    out = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out.append((dict(sample.labels), float(sample.value)))
    return out


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The sum of the samples of `name` whose labels include `labels`; None when there is none."""
    values = [v for lbls, v in metric_samples(text, name)
              if all(lbls.get(k) == want for k, want in labels.items())]
    return sum(values) if values else None
