"""spec.strategy and spec.dataset.packing: validation with field names, the trainer's environment,
and the run fingerprint of jobs created before the fields existed (docs/TRAINER.md "FSDP", "Packing")."""

from __future__ import annotations

import pytest
from jobkit import spec_dict

from finetune_operator.api import SpecError, parse_spec
from finetune_operator.api.crd import build_crd
from finetune_operator.core.run_definition import legacy_run_fingerprint, run_definition, run_fingerprint
from finetune_operator.trainer_env import trainer_env


def test_defaults_and_the_trainer_environment():
    spec = parse_spec(spec_dict())
    assert spec.strategy == "DDP" and spec.dataset.packing is False
    env = trainer_env(spec)
    assert (env["FT_STRATEGY"], env["FT_PACKING"]) == ("ddp", "false")
    fsdp = parse_spec(spec_dict(strategy="FSDP", resources={"gpus": 4}, dataset={"path": "/d", "packing": True}))
    env = trainer_env(fsdp)
    assert (env["FT_STRATEGY"], env["FT_PACKING"], env["FT_NPROC_PER_NODE"]) == ("fsdp", "true", "4")
    assert parse_spec(spec_dict(strategy="FSDP", workers=2)).strategy == "FSDP"  # 1 GPU on each of 2 nodes


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"strategy": "FSDP", "method": "QLoRA", "resources": {"gpus": 2}},
         "strategy FSDP does not support method QLoRA"),
        ({"strategy": "FSDP"}, "strategy FSDP shards the model across GPUs: it needs resources.gpus x workers >= 2"),
        ({"strategy": "ZeRO3"}, "strategy"),
        ({"dataset": {"path": "/d", "packing": "sometimes"}}, "dataset.packing"),
    ],
)
def test_bad_combinations_are_refused_naming_the_fields(extra, needle):
    with pytest.raises(SpecError, match=needle):
        parse_spec(spec_dict(**extra))


def test_the_crd_refuses_the_same_combinations_with_cel():
    rules = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "x-kubernetes-validations"
    ]
    messages = {r["message"] for r in rules}
    assert any("strategy FSDP does not support method QLoRA" in m for m in messages)
    assert any("resources.gpus x workers >= 2" in m for m in messages)
    spec_props = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec_props["strategy"]["enum"] == ["DDP", "FSDP"] and spec_props["strategy"]["default"] == "DDP"
    assert spec_props["dataset"]["properties"]["packing"]["type"] == "boolean"
    assert {"rule": "self == oldSelf", "message": spec_props["strategy"]["x-kubernetes-validations"][0]["message"]} \
        == spec_props["strategy"]["x-kubernetes-validations"][0]


def test_fingerprints_of_jobs_without_the_new_fields_are_unchanged():
    spec = parse_spec(spec_dict())
    before = {"image", "model", "dataset", "method", "lora", "hyperparameters", "resources", "workers",
              "trainingArguments", "checkpoint"}  # the keys hashed before strategy existed
    assert set(run_definition(spec)) == before and "strategy" not in run_definition(spec, legacy=True)
    assert "packing" not in run_definition(spec)["dataset"]
    fsdp = parse_spec(spec_dict(strategy="FSDP", resources={"gpus": 2}))
    assert run_definition(fsdp)["strategy"] == "FSDP" and run_fingerprint(fsdp) != run_fingerprint(spec)
    assert legacy_run_fingerprint(spec) == legacy_run_fingerprint(parse_spec(spec_dict()))
