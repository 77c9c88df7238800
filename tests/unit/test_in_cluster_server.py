"""The operator finds the API server in a pod the way client-go does (service env vars)."""
from __future__ import annotations

from finetune_operator.__main__ import in_cluster_server


def test_service_env_gives_the_server():
    assert in_cluster_server({"KUBERNETES_SERVICE_HOST": "10.96.0.1",
                              "KUBERNETES_SERVICE_PORT": "443"}) == "https://10.96.0.1:443"


def test_ipv6_host_is_bracketed():
    assert in_cluster_server({"KUBERNETES_SERVICE_HOST": "fd00::1",
                              "KUBERNETES_SERVICE_PORT": "6443"}) == "https://[fd00::1]:6443"


def test_without_both_variables_kopf_default_stays():
    assert in_cluster_server({}) is None
    assert in_cluster_server({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}) is None
