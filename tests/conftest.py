"""Shared fixtures. The local control plane starts once per session, only when a
collected test asks for it; each test gets a fresh namespace."""
from __future__ import annotations

import os

# Offline before anything imports transformers (trainer.md pitfall 3).
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import re
import uuid

import pytest

from finetune_testbed.cluster import LocalCluster
from finetune_testbed.procs import wait_for


@pytest.fixture(scope="session")
def cluster():
    c = LocalCluster()
    c.start()
    print(f"\nlocal control plane ready in {c.startup_seconds:.1f}s at {c.workdir}")
    try:
        yield c
    finally:
        c.cleanup()


@pytest.fixture(scope="session")
def kube(cluster):
    """A synchronous kubernetes client for test assertions (the operator has its own)."""
    from kubernetes import client, config
    api_client = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    yield client
    api_client.close()


@pytest.fixture(scope="session")
def api_client(cluster):
    from kubernetes import config
    c = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    yield c
    c.close()


@pytest.fixture
def core(api_client):
    from kubernetes import client
    return client.CoreV1Api(api_client)


@pytest.fixture
def namespace(cluster, request):
    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", name)
    # Pods are refused until the controller-manager made the default ServiceAccount.
    wait_for(lambda: cluster.kubectl("get", "sa", "default", "-n", name,
                                     check=False).returncode == 0, 60, f"default SA in {name}")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
