"""examples/hub-model-trainingjob.yaml and examples/storage/stage-job.yaml fit together and fit the
operator: the staging Job writes the data where the job reads it, every claim either uses is
defined in the examples, and the job's pod gets HF_HOME on the cache claim, the hub online, the
token and the push credentials from their Secrets (docs/TRAINER.md "Models", "Push")."""
from __future__ import annotations

from pathlib import PurePosixPath

import yaml

import finetune_contract as c
from finetune_operator.api import parse_spec
from finetune_operator.pods import MODEL_CACHE_PATH, build_pod
from finetune_operator.trainer_env import trainer_env
from finetune_testbed.cluster import REPO

EXAMPLES = REPO / "examples"


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]


def claims(volumes: list[dict], mounts: list[dict]) -> dict[str, str]:
    claim_of = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v}
    return {m["mountPath"]: claim_of[m["name"]] for m in mounts if m["name"] in claim_of}


def test_staging_job_writes_the_data_where_the_hub_job_reads_it():
    cache_claim, job = docs("hub-model-trainingjob.yaml")
    spec = job["spec"]
    stage = docs("storage/stage-job.yaml")[0]["spec"]["template"]["spec"]
    written = claims(stage["volumes"], stage["containers"][0]["volumeMounts"])
    read = claims(spec["template"]["volumes"], spec["template"]["volumeMounts"])
    (data_mount, data_claim), = read.items()
    assert written[data_mount] == data_claim
    assert PurePosixPath(spec["dataset"]["path"]).is_relative_to(data_mount)
    assert spec["dataset"]["path"] in stage["containers"][0]["args"][0], "the staging script writes elsewhere"
    defined = {d["metadata"]["name"] for d in docs("storage/claims.yaml")} | {cache_claim["metadata"]["name"]}
    assert {data_claim, spec["checkpoint"]["claimName"], spec["modelCache"]["claimName"], *written.values()} <= defined


def test_hub_job_pod_has_the_cache_the_hub_and_its_secrets():
    job = docs("hub-model-trainingjob.yaml")[1]
    spec = parse_spec(job["spec"])
    pod = build_pod(job["metadata"]["name"], "default", "u-1", spec, 1, trainer_env=trainer_env(spec))
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["HF_HOME"] == MODEL_CACHE_PATH and env["HF_HUB_OFFLINE"] == "0"
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert env["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"]["name"] == job["spec"]["output"]["push"]["s3"]["secretName"]
    assert env[c.ENV_PUSH_S3_PREFIX] == "support-bot/qwen-0.5b-v1" and env[c.ENV_MERGE] == "true"
    assert claims(pod["spec"]["volumes"], container["volumeMounts"])[MODEL_CACHE_PATH] == "hf-cache"
