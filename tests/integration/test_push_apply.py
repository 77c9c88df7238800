"""spec.output.push and spec.modelCache as the real API server checks them at `kubectl apply`:
a bad value is refused with the field's path (the CRD schema generated from the models)."""
from __future__ import annotations

import pytest
import yaml

pytestmark = pytest.mark.cluster

S3 = {"bucket": "adapters", "endpoint": "http://minio.storage:9000", "secretName": "s3-credentials"}


def _job(**spec: object) -> str:
    return yaml.safe_dump({
        "apiVersion": "finetune.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "push"},
        "spec": {"image": "example.invalid/trainer:1", "model": "org/model", "dataset": {"path": "/data/t.jsonl"},
                 "hyperparameters": {"maxSteps": 1}, **spec},
    })


def _dry_run(cluster, namespace, text: str):
    return cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=text, check=False)


def test_valid_push_and_model_cache_are_accepted(cluster, namespace, crd):
    out = _dry_run(cluster, namespace, _job(output={"merge": True, "push": {"s3": {**S3, "prefix": "a/b"}}},
                                            modelCache={"claimName": "hf-cache"}))
    assert out.returncode == 0 and "(server dry run)" in out.stdout, out.stderr


@pytest.mark.parametrize(("s3", "field"), [
    ({**S3, "endpoint": "minio.storage:9000"}, "spec.output.push.s3.endpoint"),
    ({**S3, "bucket": "Bad_Bucket"}, "spec.output.push.s3.bucket"),
    ({k: v for k, v in S3.items() if k != "secretName"}, "spec.output.push.s3.secretName"),
])
def test_bad_push_is_refused_naming_the_field(cluster, namespace, crd, s3, field):
    out = _dry_run(cluster, namespace, _job(output={"push": {"s3": s3}}))
    assert out.returncode != 0 and field in out.stderr, out.stderr


def test_model_cache_needs_a_claim(cluster, namespace, crd):
    out = _dry_run(cluster, namespace, _job(modelCache={}))
    assert out.returncode != 0 and "spec.modelCache.claimName" in out.stderr, out.stderr
