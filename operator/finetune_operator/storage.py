"""Where a job's files live on its checkpoint claim (docs/CONTRACTS.md, "Storage"). Pure.

Every job owns `trainingjobs/<namespace>/<name>/<uid>/` on the claim: two jobs sharing a
claim never see each other's checkpoints, and a job re-created under the same name (a new
uid) starts from step 0 instead of resuming its predecessor. The pod mounts only that
directory (`subPath`), so the trainer's paths stay `<mountPath>/output` and
`<mountPath>/checkpoints`. Paths in status are `pvc://<claim>/<path>` URIs, the form KServe's
`storageUri` takes, so a finished adapter can be served without translating its address.
"""

from __future__ import annotations

import posixpath

JOBS_ROOT = "trainingjobs"
OUTPUT_SUBDIR = "output"
CHECKPOINTS_SUBDIR = "checkpoints"
PVC_SCHEME = "pvc://"
# Where an explicitly requested starting checkpoint (spec.checkpoint.resumeFrom) is mounted.
RESUME_FROM_MOUNT_PATH = "/resume-from"


def job_directory(namespace: str, name: str, uid: str) -> str:
    """The job's directory relative to the claim's root."""
    return posixpath.join(JOBS_ROOT, namespace, name, uid)


def claim_uri(claim: str, path: str) -> str:
    return f"{PVC_SCHEME}{claim}/{path}"


def output_uri(claim: str, namespace: str, name: str, uid: str) -> str:
    return claim_uri(claim, posixpath.join(job_directory(namespace, name, uid), OUTPUT_SUBDIR))


def checkpoints_uri(claim: str, namespace: str, name: str, uid: str) -> str:
    return claim_uri(claim, posixpath.join(job_directory(namespace, name, uid), CHECKPOINTS_SUBDIR))


def split_claim_uri(uri: str) -> tuple[str, str] | None:
    """`pvc://<claim>/<path>` → (claim, path); None when it is not of that form or the path
    is empty, absolute or climbs out of the claim."""
    if not uri.startswith(PVC_SCHEME):
        return None
    claim, _, path = uri[len(PVC_SCHEME):].partition("/")
    path = path.strip("/")
    if not claim or not path or ".." in path.split("/"):
        return None
    return claim, path


def pod_output_dir(mount_path: str) -> str:
    """The trainer's output directory inside the pod (the job's directory is mounted here)."""
    return posixpath.join(mount_path, OUTPUT_SUBDIR)


def pod_checkpoint_dir(mount_path: str) -> str:
    """The trainer's checkpoint directory inside the pod."""
    return posixpath.join(mount_path, CHECKPOINTS_SUBDIR)
