"""The real node (kubelet + containerd + runc + CNI, fake-gpu-plugin) shared by the
end-to-end tests: started once for this package (tests/e2e has an __init__.py for that), and
stopped when its last test is done, so it neither idles through nor disturbs the rest."""
from __future__ import annotations

import pytest

from finetune_testbed.realjob import ASSETS_CLAIM, prepare_assets
from finetune_testbed.realnode import OPERATOR_IMAGE, TRAINER_IMAGE, RealNode


@pytest.fixture(scope="package")
def assets(tmp_path_factory):
    return prepare_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="package")
def real_node(cluster, crd):
    node = RealNode(cluster, gpus=2, images=(TRAINER_IMAGE, OPERATOR_IMAGE))
    node.start()
    print(f"\nreal node {node.name} Ready in {node.startup_seconds:.1f}s")
    yield node
    node.cleanup()


@pytest.fixture
def claims(real_node, namespace, assets):
    """Creates `<name>` as a fresh claim in the test's namespace, next to the assets claim."""
    real_node.create_pvc(namespace, ASSETS_CLAIM, path=assets)
    return lambda name: real_node.create_pvc(namespace, name)
