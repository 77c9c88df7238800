"""Push of the output directory to an S3-compatible store (FT_PUSH_S3_*; docs/TRAINER.md "Push").

Torch-free. Rank 0 checks the bucket and the credentials before training (a wrong key fails in
seconds, not after the run) and copies the output directory after the adapter (and ``merged/``)
are saved. The copy is keyed by each file's path under the output directory, so pushing again
(a resumed attempt that finds the run complete) overwrites the same objects: idempotent. The job
reports the push only in a ``completed`` termination message, written after the last object is
stored, so an attempt killed mid-push is never counted as pushed; the next one pushes again.

The client is MinIO's Python SDK (``minio``), which speaks S3 to AWS and every S3-compatible
store; boto3 is not used because botocore pins python-dateutil < 3 (docs/TRAINER.md "Push").
"""

from __future__ import annotations

import io
import os
import time
from typing import Any
from urllib.parse import urlsplit

import finetune_contract as c

from .util import LOG

DEFAULT_ENDPOINT = "https://s3.amazonaws.com"
# S3 error codes that no retry can fix: the credentials or the bucket are wrong (exit 78).
FATAL_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "InvalidBucketName",
        "NoSuchBucket",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "AuthorizationHeaderMalformed",
    }
)
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


class PushError(RuntimeError):
    """The push failed for a reason a later attempt may not see (network, the store's 5xx): exit 1."""


def _client(cfg: c.TrainerConfig) -> Any:
    try:
        from minio import Minio
        from minio.credentials import EnvAWSProvider
    except ImportError:  # an image built before the push existed: no retry helps
        raise c.ConfigError(f"push to {cfg.push_uri} needs the 'minio' package, which this trainer image lacks "
                            "(trainer-image/pyproject.toml)") from None

    missing = [name for name in CREDENTIAL_VARIABLES if not os.environ.get(name)]
    if missing:
        raise c.ConfigError(
            f"push to {cfg.push_uri} needs {' and '.join(missing)} in the environment "
            "(spec.output.push.s3.secretName: a Secret with those keys)"
        )
    url = urlsplit(cfg.push_s3_endpoint or DEFAULT_ENDPOINT)
    if url.path not in ("", "/") or not url.netloc:
        raise c.ConfigError(f"{c.ENV_PUSH_S3_ENDPOINT} must be a URL without a path, got {cfg.push_s3_endpoint!r}")
    return Minio(url.netloc, secure=url.scheme == "https", region=cfg.push_s3_region or None,
                 credentials=EnvAWSProvider())


def _failure(cfg: c.TrainerConfig, what: str, e: Exception) -> Exception:
    """The error to raise for ``e``: a ConfigError when no retry can help, else a PushError."""
    from minio.error import S3Error

    where = cfg.push_uri
    if isinstance(e, S3Error):
        detail = f"{e.code}: {e.message}"
        if e.code in FATAL_CODES:
            return c.ConfigError(f"push to {where}: the store refused {what} ({detail}); "
                                 "check spec.output.push.s3 and its Secret")
        return PushError(f"push to {where}: {what} failed ({detail})")
    return PushError(f"push to {where}: {what} failed ({type(e).__name__}: {c.one_line(str(e), 300)})")


def check(cfg: c.TrainerConfig) -> None:
    """Before training (rank 0): the credentials may write to the bucket.

    Writes and removes a zero-byte object under the prefix: only s3:PutObject is needed (a
    failed removal is logged, not fatal). Raises ConfigError for wrong credentials or a missing
    bucket, PushError when the store cannot be reached.
    """
    if not cfg.push_s3_bucket:
        return
    from minio.error import S3Error

    client = _client(cfg)
    probe = _key(cfg, ".finetune-push-check")
    try:
        client.put_object(cfg.push_s3_bucket, probe, io.BytesIO(b""), 0)
    except S3Error as e:
        if e.code == "NoSuchBucket":
            raise c.ConfigError(f"push to {cfg.push_uri}: bucket {cfg.push_s3_bucket!r} does not exist") from None
        raise _failure(cfg, "the check before training", e) from None
    except Exception as e:  # broad on purpose: the SDK raises urllib3 and OS errors too
        raise _failure(cfg, "the check before training", e) from None
    try:
        client.remove_object(cfg.push_s3_bucket, probe)
    except Exception as e:  # broad on purpose: a write-only credential may not delete
        LOG.warning("push check: could not remove %s: %s", probe, c.one_line(str(e), 200))
    LOG.info("push target %s is writable (endpoint %s)", cfg.push_uri, cfg.push_s3_endpoint or DEFAULT_ENDPOINT)


def _key(cfg: c.TrainerConfig, relative: str) -> str:
    prefix = (cfg.push_s3_prefix or "").strip("/")
    return f"{prefix}/{relative}" if prefix else relative


def files_to_push(output_dir: str) -> list[str]:
    """Every file under the output directory, as sorted paths relative to it (``merged/`` included)."""
    found = []
    for root, dirs, files in os.walk(output_dir):
        dirs.sort()
        for name in files:
            found.append(os.path.relpath(os.path.join(root, name), output_dir).replace(os.sep, "/"))
    return sorted(found)


def push_output(cfg: c.TrainerConfig) -> str:
    """Copy the output directory to the store; returns the pushed location (s3://bucket/prefix/).

    Raises ConfigError (exit 78) when the store refuses the credentials or the bucket, PushError
    (exit 1, retried by the operator within backoffLimit) otherwise. The files stay on the volume.
    """
    client = _client(cfg)
    started = time.perf_counter()
    files = files_to_push(cfg.output_dir)
    if not files:
        raise PushError(f"push to {cfg.push_uri}: the output directory {cfg.output_dir} is empty")
    total = 0
    for relative in files:
        path = os.path.join(cfg.output_dir, relative)
        try:
            # fput_object uploads large files (merged weights) in parts, each retried by the SDK.
            client.fput_object(cfg.push_s3_bucket, _key(cfg, relative), path)
        except Exception as e:  # broad on purpose: the SDK raises S3Error, urllib3 and OS errors
            raise _failure(cfg, f"upload of {relative}", e) from None
        total += os.path.getsize(path)
    LOG.info("pushed %d files (%d bytes) to %s in %.1fs", len(files), total, cfg.push_uri,
             time.perf_counter() - started)
    return cfg.push_uri or ""
