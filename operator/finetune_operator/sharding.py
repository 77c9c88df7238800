"""Horizontal sharding by label, the way Flux and Argo CD shard (docs/SHARDING.md).

A replica started with `--shard NAME` owns the TrainingJobs labelled `finetune.dev/shard=NAME`;
one started with `--shard-default` owns the jobs without that label; one with neither owns all
of them (no sharding: today's behaviour). Ownership is a server-side label selector on the
TrainingJob watch and on the pod watch (each pod carries its job's shard label, pods.py), so a
replica lists, watches, caches and decodes only its shard. Each shard has its own Lease
(`<leader-election-name>-<shard>`), so two replicas per shard give one leader and one standby.

A job relabelled while an attempt runs leaves the old shard's watch (the API server sends
DELETED to a label-selector watch when the object stops matching) and enters the new one's.
Its pods keep the old label (the operator has no patch on pods, deploy/README.md "RBAC"), so
the new owner's pod watch never delivers them: `Handoffs` lists them instead, at first sight
and at every reconcile of such a job, until its pods carry this shard's label (the next
attempt's pods do)."""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .api import LABEL_ATTEMPT, LABEL_JOB_NAME, LABEL_MANAGED_BY, MANAGED_BY, TERMINAL_PHASES
from .core import counts_for

log = logging.getLogger("finetune.sharding")
LABEL_SHARD = "finetune.dev/shard"
DEFAULT_SHARD = "default"  # the --shard-default replica's Lease suffix, hence no shard by that name
# A shard name is a label value and part of a Lease name: a DNS label keeps both valid.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# How long a job that entered this shard is also looked up by LIST: past one write of the old
# owner that may still be in flight (its request timeout is 60 s, handlers.configure).
HANDOFF_GRACE_SECONDS = 120.0
Key = tuple[str, str]


def shard_name_error(name: str) -> str | None:
    """Why `--shard NAME` is refused; None when it is a valid shard name."""
    if name == DEFAULT_SHARD:
        return (f"--shard {DEFAULT_SHARD!r} is reserved for the jobs without the {LABEL_SHARD} label: "
                "use --shard-default")
    if len(name) > 63 or not _NAME.match(name):
        return (f"--shard {name!r} must be a DNS label (lowercase letters, digits and '-', "
                "at most 63 characters): it is a label value and part of the Lease name")
    return None


def shard_of(obj: Mapping[str, Any]) -> str | None:
    """The object's shard label; None without one."""
    return ((obj.get("metadata") or {}).get("labels") or {}).get(LABEL_SHARD)


@dataclass(frozen=True)
class Shard:
    """Which jobs this replica owns: `name` (--shard), the unlabelled ones (--shard-default), or all."""

    name: str | None = None
    default: bool = False

    def __post_init__(self) -> None:
        if self.name is not None and self.default:
            raise ValueError("--shard and --shard-default exclude each other: a label selector "
                             "cannot say 'this label value or no label'")
        if self.name is not None and (err := shard_name_error(self.name)):
            raise ValueError(err)

    @classmethod
    def of(cls, cfg: Any) -> Shard:
        """From an OperatorConfig (its `shard` and `shard_default`)."""
        return cls(cfg.shard, cfg.shard_default)

    @property
    def enabled(self) -> bool:
        return self.name is not None or self.default

    def selector(self) -> str | None:
        """The label selector of the TrainingJob watch; None: every job."""
        if self.name is not None:
            return f"{LABEL_SHARD}={self.name}"
        return f"!{LABEL_SHARD}" if self.default else None

    def pod_selector(self, base: str) -> str:
        sel = self.selector()
        return f"{base},{sel}" if sel else base

    def owns(self, obj: Mapping[str, Any]) -> bool:
        """The selector, evaluated here: for a job read by GET (no selector on a GET)."""
        value = shard_of(obj)
        if self.name is not None:
            return value == self.name
        return value is None if self.default else True

    def lease_name(self, base: str) -> str:
        if self.name is not None:
            return f"{base}-{self.name}"
        return f"{base}-{DEFAULT_SHARD}" if self.default else base

    def describe(self) -> str:
        if self.name is not None:
            return f"shard {self.name} (jobs labelled {LABEL_SHARD}={self.name})"
        return f"the default shard (jobs without {LABEL_SHARD})" if self.default else "all jobs (no sharding)"


class PodReader(Protocol):
    """What Handoffs needs of kube.KubeClient (not imported: config.py imports this module)."""

    async def get(self, path: str, **params: str) -> Any: ...

    def pod_path(self, namespace: str, name: str = "") -> str: ...


def _live_attempt(job: Mapping[str, Any]) -> int | None:
    """The attempt whose pods matter: recorded and not finished; None when there is none."""
    status = job.get("status") or {}
    attempt = status.get("attempt")
    if status.get("phase") in TERMINAL_PHASES or not isinstance(attempt, int) or attempt < 1:
        return None
    return attempt


class Handoffs:
    """Pods this replica's watch cannot see: those of a job that moved into this shard, still
    labelled with the shard that created them. Listed (one LIST by job name) at the job's first
    sight here when none of its pods is in the pod index, then at every reconcile of the job
    while any such pod is left or the grace period runs."""

    def __init__(self, client: PodReader | None, shard: Shard,
                 clock: Callable[[], float] = time.monotonic):
        self.client, self.shard, self.clock = client, shard, clock
        self.pods: dict[Key, list[dict]] = {}
        self.since: dict[Key, float] = {}

    def active(self, key: Key) -> bool:
        return key in self.since

    def extra(self, key: Key) -> list[dict]:
        return self.pods.get(key, [])

    def forget(self, key: Key) -> None:
        self.pods.pop(key, None)
        self.since.pop(key, None)

    async def first_sight(self, key: Key, job: Mapping[str, Any], indexed: Iterable[Mapping]) -> None:
        """Called before the first reconcile of a job this replica did not hold. Only a job whose
        current attempt has no pod in the index is looked up: at start-up that is a job whose pod
        is gone (kopf fills the pod index before it calls any other handler), not every job."""
        attempt = _live_attempt(job)
        if not self.shard.enabled or attempt is None:
            return
        if any(attempt_label(p) == str(attempt) for p in indexed):
            return
        self.since[key] = self.clock()
        try:
            await self.refresh(key, job)
        except Exception as exc:  # the reconcile lists again before it decides (and fails loudly)
            log.warning("%s/%s: listing its pods failed: %s", key[0], key[1], exc)

    async def refresh(self, key: Key, job: Mapping[str, Any]) -> None:
        if key not in self.since or self.client is None:
            return
        attempt = _live_attempt(job)
        if attempt is None:
            self.forget(key)
            return
        ns, name = key
        selector = f"{LABEL_JOB_NAME}={name},{LABEL_MANAGED_BY}={MANAGED_BY}"
        page = await self.client.get(self.client.pod_path(ns), labelSelector=selector)
        self.pods[key] = foreign = foreign_pods(page.get("items") or [], job, self.shard)
        log.debug("%s/%s: pods outside this shard's pod watch: %s", ns, name,
                  sorted(p["metadata"]["name"] for p in foreign))
        # Done once no such pod runs or belongs to the current attempt (the next attempt's pods
        # carry this shard's label) and the old owner's last write cannot be in flight any more.
        matters = [p for p in foreign if attempt_label(p) == str(attempt)
                   or (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
        if not matters and self.clock() - self.since[key] > HANDOFF_GRACE_SECONDS:
            self.forget(key)


def foreign_pods(pods: Iterable[dict], job: Mapping[str, Any], shard: Shard) -> list[dict]:
    """The job's pods (controller ownerReference) that this shard's pod watch does not deliver."""
    uid = (job.get("metadata") or {}).get("uid") or ""
    return [p for p in pods if counts_for(p, uid) and not shard.owns(p)]


def attempt_label(pod: Mapping[str, Any]) -> str | None:
    return ((pod.get("metadata") or {}).get("labels") or {}).get(LABEL_ATTEMPT)


def with_shard_label(labels: Mapping[str, str], shard: str | None) -> dict[str, str]:
    """A pod's `labels` with its job's shard label `shard`; without one, also without a shard
    label a template brought (the default shard's pod watch selects pods without the label)."""
    out = {k: v for k, v in labels.items() if k != LABEL_SHARD}
    if shard is not None:
        out[LABEL_SHARD] = shard
    return out
