"""Build the trainer pod for one attempt: spec in, pod manifest dict out. Pure, no API calls."""

from __future__ import annotations

import copy
from typing import Any

import finetune_contract as contract

from . import storage
from .api.models import (
    ANNOTATION_GANG_SIZE,
    API_VERSION,
    KIND,
    LABEL_ATTEMPT,
    LABEL_JOB_NAME,
    LABEL_MANAGED_BY,
    LABEL_POD_GROUP,
    LABEL_RANK,
    MANAGED_BY,
    METRICS_PORT,
    TRAINER_CONTAINER,
    TrainingJobSpec,
)
from .core import kueue, pod_name
from .sharding import with_shard_label

TRAINER_COMMAND = ["python", "-m", "finetune_trainer"]
CHECKPOINT_VOLUME = "checkpoints"
# spec.modelCache: the claim mounted here and HF_HOME pointed at it.
MODEL_CACHE_VOLUME = "model-cache"
MODEL_CACHE_PATH = "/var/cache/huggingface"
# NCCL moves data between a node's GPUs through /dev/shm; the runtime's default is 64 MiB.
SHM_VOLUME = "dshm"
SHM_PATH = "/dev/shm"
TERMINATION_MESSAGE_PATH = contract.DEFAULT_TERMINATION_LOG
RUN_AS_USER = 1000

# Pod Security "restricted" out of the box; template keys replace these one by one.
DEFAULT_POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS_USER,
    "runAsGroup": RUN_AS_USER,
    "fsGroup": RUN_AS_USER,  # so the trainer can write to the checkpoint volume
    "seccompProfile": {"type": "RuntimeDefault"},
}
DEFAULT_CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def pod_labels(job_name: str, attempt: int, rank: int = 0, workers: int = 1) -> dict[str, str]:
    labels = {LABEL_JOB_NAME: job_name, LABEL_ATTEMPT: str(attempt), LABEL_MANAGED_BY: MANAGED_BY}
    if workers > 1:
        labels |= {LABEL_RANK: str(rank), LABEL_POD_GROUP: f"{job_name}-{attempt}"}
    return labels


def rank_hostname(rank: int) -> str:
    """The pod's hostname in the job's headless Service: rank-<r>.<job> resolves to it."""
    return f"rank-{rank}"


def gang_env(job_name: str, spec: TrainingJobSpec, rank: int) -> dict[str, str]:
    """torchrun's rendezvous for one rank: rank 0's TCP store, found through the Service."""
    if spec.workers == 1:
        return {}
    return contract.gang_env(spec.workers, rank, f"{rank_hostname(0)}.{job_name}")


def build_service(job_name: str, namespace: str, uid: str) -> dict[str, Any]:
    """The headless Service that gives a gang's pods their DNS names. It selects every attempt's
    pods; only one attempt is ever live. publishNotReadyAddresses: the ranks look each other up
    while starting, before any is Ready."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": job_name,
            "namespace": namespace,
            "labels": {LABEL_JOB_NAME: job_name, LABEL_MANAGED_BY: MANAGED_BY},
            "ownerReferences": [_owner(job_name, uid)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB_NAME: job_name, LABEL_MANAGED_BY: MANAGED_BY},
            "ports": [{"name": "rendezvous", "port": contract.DEFAULT_MASTER_PORT, "protocol": "TCP"}],
        },
    }


def _owner(job_name: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": job_name, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def _resources(spec: TrainingJobSpec) -> dict[str, Any]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if spec.resources.gpus > 0:
        # Extended resources must have requests == limits.
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(spec.resources.gpus)
    if spec.resources.cpu:
        requests["cpu"] = spec.resources.cpu  # no CPU limit: throttling a data loader only slows training
    if spec.resources.memory:
        requests["memory"] = limits["memory"] = spec.resources.memory
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _env(trainer_env: dict[str, str], spec: TrainingJobSpec, job_dir: str) -> list[dict[str, Any]]:
    env = {name: {"name": name, "value": str(value)} for name, value in sorted(trainer_env.items())}
    env |= {var["name"]: var for var in _generated_env(spec, job_dir)}
    for var in (spec.template.env if spec.template else None) or []:
        env[var.name] = var.model_dump(exclude_none=True)  # the template wins over the generated value
    return list(env.values())


def _generated_env(spec: TrainingJobSpec, job_dir: str) -> list[dict[str, Any]]:
    """The push's credentials from its Secret (standard AWS names) and default prefix; HF_HOME on the
    model cache claim (docs/TRAINER.md "Push", "Models")."""
    out: list[dict[str, Any]] = []
    s3 = spec.output.push.s3 if spec.output.push else None
    if s3 is not None:
        if s3.prefix is None:
            out.append({"name": contract.ENV_PUSH_S3_PREFIX, "value": job_dir})
        for key, optional in (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False),
                              ("AWS_SESSION_TOKEN", True)):
            ref: dict[str, Any] = {"name": s3.secret_name, "key": key}
            if optional:
                ref["optional"] = True
            out.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    if spec.model_cache is not None:
        out.append({"name": "HF_HOME", "value": MODEL_CACHE_PATH})
    return out


def _volumes(spec: TrainingJobSpec, job_dir: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The checkpoint claim mounted at mountPath, but only the job's own directory of it
    (storage.job_directory), so no job reads or overwrites another's files; an explicit
    resumeFrom checkpoint of the same claim is mounted read-only beside it."""
    checkpoint = spec.checkpoint
    source: dict[str, Any] = (
        {"persistentVolumeClaim": {"claimName": checkpoint.claim_name}} if checkpoint.claim_name else {"emptyDir": {}}
    )
    volumes = [{"name": CHECKPOINT_VOLUME, **source}]
    mount: dict[str, Any] = {"name": CHECKPOINT_VOLUME, "mountPath": checkpoint.mount_path}
    if checkpoint.claim_name:
        mount["subPath"] = job_dir
    mounts: list[dict[str, Any]] = [mount]
    resume = storage.split_claim_uri(checkpoint.resume_from) if checkpoint.resume_from else None
    if resume is not None:
        mounts.append({"name": CHECKPOINT_VOLUME, "mountPath": storage.RESUME_FROM_MOUNT_PATH,
                       "subPath": resume[1], "readOnly": True})
    if spec.model_cache is not None:
        claim = {"claimName": spec.model_cache.claim_name}
        volumes.append({"name": MODEL_CACHE_VOLUME, "persistentVolumeClaim": claim})
        cache_mount = {"name": MODEL_CACHE_VOLUME, "mountPath": MODEL_CACHE_PATH}
        mounts.append(cache_mount | ({"subPath": spec.model_cache.sub_path} if spec.model_cache.sub_path else {}))
    template = spec.template
    if template is not None:
        volumes += [copy.deepcopy(v) for v in template.volumes or []]
        mounts += [m.model_dump(exclude_none=True) for m in template.volume_mounts or []]
    # A template that brings its own /dev/shm (or a volume by our name) keeps it.
    if not any(m["mountPath"] == SHM_PATH for m in mounts) and not any(v.get("name") == SHM_VOLUME for v in volumes):
        volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": SHM_VOLUME, "mountPath": SHM_PATH})
    return volumes, mounts


def _merged(defaults: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    return {**copy.deepcopy(defaults), **copy.deepcopy(overrides or {})}


def build_pod(
    job_name: str,
    namespace: str,
    uid: str,
    spec: TrainingJobSpec,
    attempt: int,
    *,
    trainer_env: dict[str, str],
    rank: int = 0,
    shard: str | None = None,
) -> dict[str, Any]:
    """The manifest of rank `rank`'s pod in attempt `attempt` of job `job_name` (owner uid `uid`);
    `shard` is the job's finetune.dev/shard label, copied so that its shard's pod watch sees the pod."""
    template = spec.template
    template_meta = template.metadata if template is not None and template.metadata is not None else None
    labels = {**(template_meta.labels if template_meta else {}), **pod_labels(job_name, attempt, rank, spec.workers)}
    annotations = dict(template_meta.annotations) if template_meta else {}
    if spec.workers > 1:
        annotations[ANNOTATION_GANG_SIZE] = str(spec.workers)
    # Kueue's plain-pod integration (docs/CONTRACTS.md, "Queueing with Kueue"); ours win over the template's.
    group = kueue.pod_group(job_name, attempt)
    labels |= kueue.pod_labels(spec.queue_name, spec.workload_priority_class_name, group, spec.workers)
    labels = with_shard_label(labels, shard)
    annotations |= kueue.pod_annotations(spec.queue_name, spec.workers)
    job_dir = storage.job_directory(namespace, job_name, uid)
    volumes, mounts = _volumes(spec, job_dir)

    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": spec.image,
        "command": list(TRAINER_COMMAND),
        "env": _env({**trainer_env, **gang_env(job_name, spec, rank)}, spec, job_dir),
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "resources": _resources(spec),
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _merged(
            DEFAULT_CONTAINER_SECURITY_CONTEXT, template.container_security_context if template else None
        ),
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": spec.run_policy.termination_grace_period_seconds,
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "securityContext": _merged(DEFAULT_POD_SECURITY_CONTEXT, template.security_context if template else None),
        "containers": [container],
        "volumes": volumes,
    }
    if template is not None:
        optional = {
            "nodeSelector": template.node_selector,
            "tolerations": template.tolerations,
            "affinity": template.affinity,
            "priorityClassName": template.priority_class_name,
            "schedulerName": template.scheduler_name,
            "serviceAccountName": template.service_account_name,
            "imagePullSecrets": [s.model_dump() for s in template.image_pull_secrets]
            if template.image_pull_secrets
            else None,
            "hostNetwork": template.host_network or None,
        }
        pod_spec.update({key: copy.deepcopy(value) for key, value in optional.items() if value})

    if spec.workers > 1:
        pod_spec |= {"hostname": rank_hostname(rank), "subdomain": job_name}
    metadata: dict[str, Any] = {
        "name": pod_name(job_name, attempt, rank, spec.workers),
        "namespace": namespace,
        "labels": labels,
        "ownerReferences": [_owner(job_name, uid)],
    }
    if annotations:
        metadata["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}
