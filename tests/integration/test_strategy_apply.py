"""spec.strategy and spec.dataset.packing at `kubectl apply`: the API server's CEL rules refuse the
FSDP combinations that cannot work, naming the fields, and keep strategy immutable (docs/TRAINER.md "FSDP")."""

from __future__ import annotations

import json

import pytest

from finetune_testbed.jobs import job_manifest

pytestmark = pytest.mark.cluster


def _apply(cluster, namespace, manifest):
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest), check=False)


@pytest.mark.parametrize(
    "name, fields, needle",
    [
        ("fsdp-qlora", {"strategy": "FSDP", "method": "QLoRA", "resources": {"gpus": 2}},
         "strategy FSDP does not support method QLoRA"),
        ("fsdp-one-gpu", {"strategy": "FSDP"}, "strategy FSDP shards the model across GPUs: it needs "
                                               "resources.gpus x workers >= 2"),
        ("fsdp-zero", {"strategy": "FSDP", "resources": {"gpus": 0}}, "resources.gpus x workers >= 2"),
        ("zero3", {"strategy": "ZeRO3"}, 'spec.strategy: Unsupported value: "ZeRO3"'),
    ],
)
def test_fsdp_combinations_that_cannot_work_are_refused_at_apply(cluster, namespace, crd, name, fields, needle):
    res = _apply(cluster, namespace, job_manifest(name, **fields))
    assert res.returncode != 0 and needle in res.stderr, res.stderr


def test_fsdp_on_two_gpus_or_two_nodes_with_packing_is_accepted_and_strategy_is_immutable(cluster, namespace, crd):
    for name, fields in (("fsdp-gpus", {"resources": {"gpus": 2}}), ("fsdp-nodes", {"workers": 2})):
        manifest = job_manifest(name, strategy="FSDP", dataset={"path": "/data/x.jsonl", "packing": True}, **fields)
        res = _apply(cluster, namespace, manifest)
        assert res.returncode == 0, res.stderr
    got = json.loads(cluster.kubectl("get", "tj", "fsdp-gpus", "-n", namespace, "-o", "json").stdout)["spec"]
    assert got["strategy"] == "FSDP" and got["dataset"]["packing"] is True
    default = _apply(cluster, namespace, job_manifest("plain"))
    assert default.returncode == 0, default.stderr
    plain = json.loads(cluster.kubectl("get", "tj", "plain", "-n", namespace, "-o", "json").stdout)["spec"]
    assert plain["strategy"] == "DDP" and plain["dataset"]["packing"] is False
    res = cluster.kubectl("patch", "tj", "fsdp-gpus", "-n", namespace, "--type", "merge",
                          "-p", json.dumps({"spec": {"strategy": "DDP"}}), check=False)  # fmt: skip
    assert res.returncode != 0 and "strategy is immutable" in res.stderr, res.stderr
