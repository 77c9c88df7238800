"""spec.output.push and spec.modelCache down to the pod (docs/TRAINER.md "Push", "Models"): the
push's FT_* variables and its credentials from the Secret by their standard AWS names, a default
prefix that is the job's own, the pushed location in the success message, HF_HOME on the cache
claim, and hub ids run online while paths stay offline; bad values refused by field."""

from __future__ import annotations

import pytest
from jobkit import T0, exited_pod, make_spec, step

import finetune_contract as c
from finetune_operator.api import TrainingJobStatus
from finetune_operator.api.parsing import SpecError
from finetune_operator.pods import MODEL_CACHE_PATH, build_pod
from finetune_operator.trainer_env import trainer_env

S3 = {"bucket": "adapters", "endpoint": "http://minio.storage:9000", "secretName": "s3-credentials"}


def _container(spec):
    pod = build_pod("ft", "team-a", "uid-1", spec, 1, trainer_env=trainer_env(spec))
    return pod, pod["spec"]["containers"][0]


def _env(container) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_push_reaches_the_trainer_with_credentials_from_the_secret():
    _, container = _container(make_spec(output={"merge": True, "push": {"s3": {**S3, "region": "eu-1"}}}))
    env = _env(container)
    assert env[c.ENV_PUSH_S3_BUCKET] == "adapters" and env[c.ENV_PUSH_S3_ENDPOINT] == "http://minio.storage:9000"
    assert env[c.ENV_PUSH_S3_REGION] == "eu-1" and env[c.ENV_MERGE] == "true"
    assert env[c.ENV_PUSH_S3_PREFIX] == "trainingjobs/team-a/ft/uid-1"  # the job's own, like its claim directory
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3-credentials", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3-credentials", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert env["AWS_SESSION_TOKEN"] == {"secretKeyRef": {"name": "s3-credentials", "key": "AWS_SESSION_TOKEN",
                                                         "optional": True}}
    cfg = c.TrainerConfig.from_env({e["name"]: e["value"] for e in container["env"] if "value" in e})
    assert cfg.push_uri == "s3://adapters/trainingjobs/team-a/ft/uid-1/" and not cfg.problems()


def test_push_prefix_as_given_and_no_push_no_variables():
    env = _env(_container(make_spec(output={"push": {"s3": {**S3, "prefix": "support/v3"}}}))[1])
    assert env[c.ENV_PUSH_S3_PREFIX] == "support/v3"
    env = _env(_container(make_spec())[1])
    assert not [k for k in env if k.startswith(("FT_PUSH_", "AWS_"))]


@pytest.mark.parametrize(
    ("s3", "field"),
    [
        ({**S3, "bucket": "Adapters"}, "bucket"),
        ({**S3, "endpoint": "minio:9000"}, "endpoint"),
        ({**S3, "endpoint": "https://s3.example.com/path"}, "endpoint"),
        ({**S3, "prefix": "/abs"}, "prefix"),
        ({k: v for k, v in S3.items() if k != "secretName"}, "secretName"),
    ],
)
def test_bad_push_refused_by_field(s3, field):
    with pytest.raises(SpecError) as e:
        make_spec(output={"push": {"s3": s3}})
    assert f"spec.output.push.s3.{field}" in str(e.value)


def test_success_message_says_where_it_was_pushed():
    spec = make_spec(checkpoint={"claimName": "team"}, output={"push": {"s3": S3}})
    first = step(None, spec=spec, namespace="ns", uid="u-1").status
    report = c.termination_message(c.OUTCOME_COMPLETED, step=5, pushed="s3://adapters/trainingjobs/ns/j/u-1/")
    done = step(first, [exited_pod(1, 0, report=report)], now=T0, spec=spec, namespace="ns", uid="u-1").status
    assert done.phase == "Succeeded" and done.message.endswith("; pushed to s3://adapters/trainingjobs/ns/j/u-1/")
    unpushed = step(TrainingJobStatus(**first.model_dump()), [exited_pod(1, 0, report={"outcome": "completed"})],
                    now=T0, spec=spec, namespace="ns", uid="u-1").status
    assert "pushed" not in unpushed.message


def test_model_cache_claim_is_hf_home():
    pod, container = _container(make_spec(modelCache={"claimName": "hf-cache", "subPath": "hub-cache"}))
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}} in pod["spec"]["volumes"]
    assert {"name": "model-cache", "mountPath": MODEL_CACHE_PATH, "subPath": "hub-cache"} in container["volumeMounts"]
    assert _env(container)["HF_HOME"] == MODEL_CACHE_PATH


def test_hub_ids_run_online_paths_stay_offline_and_the_template_decides_last():
    assert {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}.items() <= trainer_env(make_spec(model="org/m")).items()
    assert "HF_HUB_OFFLINE" not in trainer_env(make_spec(model="/models/m"))  # the image's HF_HUB_OFFLINE=1 holds
    spec = make_spec(model="org/m", template={"env": [{"name": "HF_HUB_OFFLINE", "value": "1"}]})
    assert _env(_container(spec)[1])["HF_HUB_OFFLINE"] == "1"  # e.g. a cache filled beforehand, no egress
