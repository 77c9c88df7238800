"""examples/storage/ fits examples/trainingjob.yaml: every claim the job mounts is defined there,
and the staging pod writes the model and the data where the job reads them."""
from __future__ import annotations

from pathlib import PurePosixPath

import yaml

from finetune_testbed.cluster import REPO

EXAMPLES = REPO / "examples"


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]


def mounts_by_claim(volumes: list[dict], mounts: list[dict]) -> dict[str, str]:
    claim_of = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v}
    return {claim_of[m["name"]]: m["mountPath"] for m in mounts if m["name"] in claim_of}


def test_storage_examples_define_every_claim_the_example_job_uses():
    defined = {d["metadata"]["name"] for d in docs("storage/claims.yaml") if d["kind"] == "PersistentVolumeClaim"}
    job = docs("trainingjob.yaml")[0]["spec"]
    used = {job["checkpoint"]["claimName"]} | set(
        mounts_by_claim(job["template"]["volumes"], job["template"]["volumeMounts"]))
    assert used <= defined, f"claims the example job mounts but examples/storage does not define: {used - defined}"


def test_staging_pod_writes_where_the_job_reads():
    job = docs("trainingjob.yaml")[0]["spec"]
    job_mounts = mounts_by_claim(job["template"]["volumes"], job["template"]["volumeMounts"])
    pod = docs("storage/stage-pod.yaml")[0]["spec"]
    stage_mounts = mounts_by_claim(pod["volumes"], pod["containers"][0]["volumeMounts"])
    assert stage_mounts == job_mounts
    for path in (job["model"], job["dataset"]["path"]):
        assert any(PurePosixPath(path).is_relative_to(m) for m in job_mounts.values()), f"{path}: on no claim"
    text = (EXAMPLES / "storage/stage-pod.yaml").read_text()
    assert job["model"] in text and job["dataset"]["path"] in text, "the staging commands name other paths"
