"""Where a job's files live: per-job directories, claim URIs, the run fingerprint (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jobkit import make_spec, observe, running_job, running_pod

from finetune_operator import storage
from finetune_operator.api.parsing import SpecError, parse_spec
from finetune_operator.core.run_definition import run_fingerprint

_name = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
_uid = st.uuids().map(str)


@given(_name, _name, _uid, _name, _uid)
def test_job_directories_never_collide(ns, name, uid, other_name, other_uid):
    a = storage.job_directory(ns, name, uid)
    assert storage.job_directory(ns, name, other_uid) != a or other_uid == uid  # re-created job: new dir
    assert storage.job_directory(ns, other_name, uid) != a or other_name == name
    # neither is inside the other: no job can see another's files through its subPath mount
    b = storage.job_directory(ns, other_name, other_uid)
    assert a == b or not (a.startswith(b + "/") or b.startswith(a + "/"))


def test_uris_use_the_kserve_pvc_form_and_round_trip():
    out = storage.output_uri("team-ckpt", "ns", "llama", "u-1")
    assert out == "pvc://team-ckpt/trainingjobs/ns/llama/u-1/output"
    assert storage.split_claim_uri(out) == ("team-ckpt", "trainingjobs/ns/llama/u-1/output")
    assert storage.checkpoints_uri("c", "ns", "j", "u").endswith("/trainingjobs/ns/j/u/checkpoints")
    for bad in ("pvc://c/", "pvc:///x", "s3://c/x", "pvc://c/a/../../etc"):
        assert storage.split_claim_uri(bad) is None, bad


def test_resume_from_must_name_the_jobs_own_claim():
    ok = make_spec(checkpoint={"claimName": "c", "resumeFrom": "pvc://c/trainingjobs/ns/old/u/checkpoints/checkpoint-9"})
    assert ok.checkpoint.resume_from.endswith("checkpoint-9")
    for checkpoint, needle in (
        ({"resumeFrom": "pvc://c/x"}, "resumeFrom needs claimName"),
        ({"claimName": "c", "resumeFrom": "pvc://other/x"}, "must be on the job's claim"),
        ({"claimName": "c", "resumeFrom": "pvc://c/a/../b"}, "must not contain '..'"),
        ({"claimName": "c", "resumeFrom": "/checkpoints/x"}, "spec.checkpoint.resumeFrom"),
    ):
        body = make_spec(checkpoint={"claimName": "c"}).model_dump(by_alias=True, exclude_none=True)
        body["checkpoint"] = checkpoint
        with pytest.raises(SpecError) as err:
            parse_spec(body)
        assert needle in err.value.message, err.value.message


def test_prompt_without_completion_is_refused_naming_the_fields():
    body = make_spec().model_dump(by_alias=True, exclude_none=True)
    body["dataset"]["promptField"] = "q"
    with pytest.raises(SpecError) as err:
        parse_spec(body)
    assert "promptField and completionField" in err.value.message
    assert "FT_" not in err.value.message


# status.runFingerprint as 0.1.0 wrote it (its run_definition: every run field with its
# defaults), for BASE_SPEC with a checkpoint claim and for one with LoRA r 16 — computed by that
# release's code, not by this one's.
FINGERPRINTS_0_1_0 = {"base": "1a1e6ef800cd2a65", "r16": "eaf3d4314a101641"}


def test_a_job_fingerprinted_by_0_1_0_still_matches_after_an_upgrade():
    from finetune_operator.core import decide
    from finetune_operator.core.run_definition import legacy_run_fingerprint

    specs = {"base": make_spec(checkpoint={"claimName": "c"}),
             "r16": make_spec(checkpoint={"claimName": "c"}, lora={"r": 16})}
    for key, spec in specs.items():
        assert legacy_run_fingerprint(spec) == FINGERPRINTS_0_1_0[key], key
        running = running_job(spec)
        old = running.model_copy(update={"run_fingerprint": FINGERPRINTS_0_1_0[key]})
        assert decide(observe(old, [running_pod(1)], spec=spec)).status.phase == "Running", key
    edited = make_spec(checkpoint={"claimName": "c"}, lora={"r": 32})
    old = running_job(specs["base"]).model_copy(update={"run_fingerprint": FINGERPRINTS_0_1_0["base"]})
    assert decide(observe(old, [running_pod(1)], spec=edited)).status.reason == "SpecChanged"


def test_fields_added_with_defaults_do_not_change_the_fingerprint():
    body = make_spec(checkpoint={"claimName": "c"}).model_dump(by_alias=True, exclude_none=True)
    explicit = {**body, "dataset": {**body["dataset"], "messagesField": "messages"},
                "hyperparameters": {**body["hyperparameters"], "precision": "auto"}}
    assert run_fingerprint(parse_spec(explicit)) == run_fingerprint(parse_spec(body))
    assert run_fingerprint(parse_spec({**body, "trainingArguments": {"warmup_ratio": 0.1}})) != run_fingerprint(
        parse_spec(body))


def test_fingerprint_covers_the_run_and_ignores_what_stays_editable():
    base = make_spec(checkpoint={"claimName": "c"})
    same = base.model_copy(update={"suspend": True})
    assert run_fingerprint(base) == run_fingerprint(same)
    body = base.model_dump(by_alias=True, exclude_none=True)
    body["runPolicy"] = {"backoffLimit": 9, "ttlSecondsAfterFinished": 60}
    assert run_fingerprint(parse_spec(body)) == run_fingerprint(base)
    for change in ({"model": "/models/other"}, {"image": "x:2"}, {"lora": {"r": 64}},
                   {"hyperparameters": {"maxSteps": 7}}, {"checkpoint": {"claimName": "d"}}):
        edited = {**base.model_dump(by_alias=True, exclude_none=True), **change}
        assert run_fingerprint(parse_spec(edited)) != run_fingerprint(base), change
