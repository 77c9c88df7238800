"""What defines a run: the spec fields that are immutable once a job exists (the CRD's
transition rules refuse edits; this fingerprint catches an edit that bypassed them). Pure.

The fingerprint leaves out values equal to their defaults, so a field added by a later
release (with a default) does not change the fingerprint of a job created before it. Jobs
fingerprinted by 0.1.0, which hashed every field with its default, are matched by
`legacy_run_fingerprint` (those fields, less the ones added since)."""

from __future__ import annotations

import hashlib
import json

from ..api.models import RUN_CHECKPOINT_FIELDS, RUN_FIELDS, TrainingJobSpec

# Run-defining fields 0.1.0 did not have (YAML names), left out of its fingerprint.
ADDED_SINCE_0_1_0: dict[str, tuple[str, ...]] = {
    "": ("trainingArguments", "strategy"),
    "dataset": ("format", "messagesField", "packing"),
    "hyperparameters": ("precision", "gradientCheckpointing"),
}

# Top-level run fields added after the fingerprint took a null for every unset field: left out
# at their default, so jobs created before them keep their fingerprint.
OMITTED_AT_DEFAULT = ("strategy",)


def run_definition(spec: TrainingJobSpec, *, legacy: bool = False) -> dict:
    body = spec.model_dump(mode="json", by_alias=True, exclude_defaults=not legacy)
    out = {name: body.get(name) for name in RUN_FIELDS}
    for name in OMITTED_AT_DEFAULT:
        if out.get(name) is None:
            del out[name]
    out["checkpoint"] = {name: (body.get("checkpoint") or {}).get(name) for name in RUN_CHECKPOINT_FIELDS}
    if legacy:
        for name in ADDED_SINCE_0_1_0[""]:
            out.pop(name, None)
        for parent, names in ADDED_SINCE_0_1_0.items():
            value = out.get(parent) if parent else None
            if isinstance(value, dict):
                out[parent] = {k: v for k, v in value.items() if k not in names}
    return out


def _digest(definition: dict) -> str:
    text = json.dumps(definition, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_fingerprint(spec: TrainingJobSpec) -> str:
    return _digest(run_definition(spec))


def legacy_run_fingerprint(spec: TrainingJobSpec) -> str:
    """The fingerprint 0.1.0 wrote into status.runFingerprint for this spec."""
    return _digest(run_definition(spec, legacy=True))
