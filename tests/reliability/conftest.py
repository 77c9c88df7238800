"""Reliability tests: crash at every write, chaos, bad input, API server outage.

Isolation (why these tests do not use the session `cluster` and `operator` fixtures):
each module runs on a control plane of its own (`rel_cluster`, module scope, a few
seconds to start). The integration suite's session operator watches *all* namespaces of
the session cluster and stays up until the session ends, so on that cluster it would act
on our objects too, and our faults (API server kills, node loss) would leak into other
tests. On a private cluster no process we did not start can touch our objects; our own
operators are additionally started with --namespace where a test owns one namespace."""
from __future__ import annotations

import re
import uuid

import pytest

from finetune_testbed.reliability import create_namespace, private_cluster


@pytest.fixture(scope="module")
def rel_cluster(request):
    nodes = getattr(request.module, "GPU_NODES", 2)
    with private_cluster(gpu_nodes=nodes) as cluster:
        yield cluster


@pytest.fixture
def fresh_namespace(rel_cluster, request):
    """Returns a factory: fresh_namespace(tag) -> a new namespace name (deleted afterwards)."""
    made: list[str] = []
    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:30].strip("-")

    def make(tag: str = "") -> str:
        name = f"{base}-{tag}-{uuid.uuid4().hex[:4]}" if tag else f"{base}-{uuid.uuid4().hex[:5]}"
        made.append(create_namespace(rel_cluster, name[:63].strip("-")))
        return made[-1]
    yield make
    for ns in made:
        rel_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
