"""What defines a run: the spec fields that are immutable once a job exists (the CRD's
transition rules refuse edits; this fingerprint catches an edit that bypassed them). Pure."""

from __future__ import annotations

import hashlib
import json

from ..api.models import RUN_CHECKPOINT_FIELDS, RUN_FIELDS, TrainingJobSpec


def run_definition(spec: TrainingJobSpec) -> dict:
    body = spec.model_dump(mode="json", by_alias=True)
    out = {name: body.get(name) for name in RUN_FIELDS}
    out["checkpoint"] = {name: (body.get("checkpoint") or {}).get(name) for name in RUN_CHECKPOINT_FIELDS}
    return out


def run_fingerprint(spec: TrainingJobSpec) -> str:
    text = json.dumps(run_definition(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
