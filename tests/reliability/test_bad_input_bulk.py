"""Bad input in bulk: hundreds of generated manifests and edits of a running job, checked by
the real API server (server-side dry run: schema, CEL and transition rules, nothing stored).

- A new manifest is refused with a message naming the field or rule, or accepted; an
  accepted one is valid for the operator's models (else they name the field) and never holds
  anything the trainer would refuse as a bad configuration (it fails only at run time).
- An edit of a running job's run-defining fields (image, model, dataset, method, lora,
  hyperparameters, resources, workers, checkpoint location) is refused, saying the field is
  immutable and to create a new job; edits of what stays editable (suspend, runPolicy, ...)
  are accepted when valid.
The end-to-end path (the operator driving accepted jobs to a clear state) is in test_bad_input.py."""
from __future__ import annotations

import copy
import uuid
from collections import Counter

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_bad_input import TJ_PATH, apply_mutations, base_manifest, field_named, mutation

from finetune_operator.api.models import RUN_CHECKPOINT_FIELDS, RUN_FIELDS
from finetune_operator.api.parsing import SpecError, parse_spec
from finetune_operator.trainer_env import trainer_config
from finetune_testbed.kuberaw import ApiError, Kube
from finetune_testbed.reliability import create_namespace

pytestmark = [pytest.mark.cluster]
SEEN: Counter = Counter()
DRY = {"fieldValidation": "Strict", "dryRun": "All"}


@pytest.fixture(scope="module")
def kube(rel_cluster):
    k = Kube(rel_cluster.kubeconfig)
    yield k
    k.close()


@pytest.fixture(scope="module")
def bulk_ns(rel_cluster):
    return create_namespace(rel_cluster, f"bulk-{uuid.uuid4().hex[:5]}")


@pytest.fixture(scope="module")
def running_job(kube, bulk_ns):
    """A stored job to edit (no operator is needed: the edits are dry runs)."""
    manifest = base_manifest("edited")
    manifest["spec"]["checkpoint"] = {"claimName": "ckpt"}
    kube.request("POST", TJ_PATH.format(ns=bulk_ns), body=manifest)
    return kube.get(f"{TJ_PATH.format(ns=bulk_ns)}/edited")


def _accepted_spec_is_runnable(stored_spec: dict, mutations) -> str:
    try:
        spec = parse_spec(stored_spec)
    except SpecError as exc:  # the operator will mark it Failed/InvalidSpec naming this field
        assert exc.field and exc.field.startswith("spec"), exc
        return "accepted, InvalidSpec"
    problems = trainer_config(spec).problems()
    assert problems == [], f"accepted at apply but the trainer would refuse it: {problems} for {mutations}"
    return "accepted"


@settings(max_examples=500, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(mutations=st.lists(mutation(), min_size=1, max_size=3))
@example(mutations=[("set", ("dataset", "promptField"), "q")])
@example(mutations=[("set", ("lora", "dropout"), 1.0)])
@example(mutations=[("set", ("hyperparameters", "sequenceLength"), 1)])
@example(mutations=[("set", ("checkpoint", "resumeFrom"), "pvc://other/x")])
def test_generated_manifests_are_refused_naming_the_field_or_are_runnable(kube, bulk_ns, mutations):
    manifest = apply_mutations(base_manifest(f"gen-{uuid.uuid4().hex[:8]}"), copy.deepcopy(mutations))
    try:
        stored = kube.request("POST", TJ_PATH.format(ns=bulk_ns), query=DRY, body=manifest)
    except ApiError as exc:
        assert exc.status in (400, 422), f"{exc.status}: {exc.message}"
        assert field_named(exc.message, mutations), f"rejection does not name the field: {exc.message!r}"
        assert "FT_" not in exc.message
        SEEN["new: refused"] += 1
        return
    SEEN["new: " + _accepted_spec_is_runnable(stored["spec"], mutations)] += 1


def _changes_run_definition(before: dict, after: dict) -> bool:
    if any(before.get(f) != after.get(f) for f in RUN_FIELDS):
        return True
    old, new = before.get("checkpoint") or {}, after.get("checkpoint") or {}
    return any(old.get(f) != new.get(f) for f in RUN_CHECKPOINT_FIELDS)


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(mutations=st.lists(mutation(), min_size=1, max_size=2))
@example(mutations=[("set", ("model",), "/models/other")])
@example(mutations=[("set", ("hyperparameters", "maxSteps"), 7)])
@example(mutations=[("set", ("checkpoint", "claimName"), "elsewhere")])
@example(mutations=[("delete", ("checkpoint", "claimName"), None)])
@example(mutations=[("set", ("suspend",), True)])
@example(mutations=[("set", ("runPolicy", "backoffLimit"), 9)])
def test_edits_of_a_running_job_keep_its_run_definition(kube, bulk_ns, running_job, mutations):
    edited = apply_mutations(copy.deepcopy(running_job), copy.deepcopy(mutations))
    path = f"{TJ_PATH.format(ns=bulk_ns)}/edited"
    try:
        stored = kube.request("PUT", path, query=DRY, body=edited)
    except ApiError as exc:
        assert exc.status in (400, 422), f"{exc.status}: {exc.message}"
        assert field_named(exc.message, mutations), f"rejection does not name the field: {exc.message!r}"
        SEEN["edit: refused"] += 1
        if "immutable" in exc.message:
            assert "create a new TrainingJob" in exc.message
            SEEN["edit: refused as immutable"] += 1
        return
    assert not _changes_run_definition(running_job["spec"], stored["spec"]), \
        f"an edit of the run definition was accepted: {mutations}"
    SEEN["edit: accepted"] += 1


def test_zz_bulk_outcomes_summary():
    """At least 500 generated manifests and 200 edits went through, and every outcome occurred."""
    print("\nbulk bad-input outcomes:", dict(SEEN))
    new = sum(v for k, v in SEEN.items() if k.startswith("new:"))
    edits = sum(v for k, v in SEEN.items() if k.startswith("edit:") and "as immutable" not in k)
    assert new >= 500 and edits >= 200, SEEN
    assert SEEN["new: refused"] and SEEN["new: accepted"], SEEN
    assert SEEN["edit: refused as immutable"] and SEEN["edit: accepted"], SEEN
