"""The shipped examples as the real API server sees them: `kubectl apply --dry-run=server`
runs the CRD's schema and CEL rules on the TrainingJob and core validation on the claims and
the staging pod, without creating anything."""
from __future__ import annotations

import pytest

from finetune_testbed.cluster import REPO

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("path", ["examples/storage/claims.yaml", "examples/storage/stage-pod.yaml",
                                  "examples/trainingjob.yaml", "examples/storage/stage-job.yaml",
                                  "examples/hub-model-trainingjob.yaml"])
def test_example_is_accepted_by_the_api_server(cluster, namespace, crd, path):
    out = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(REPO / path))
    assert "(server dry run)" in out.stdout and "Warning" not in out.stderr, (out.stdout, out.stderr)
