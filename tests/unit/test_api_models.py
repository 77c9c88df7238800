"""The pydantic models: defaults, aliases, bounds, one-line errors with field paths."""

from __future__ import annotations

import pytest
from jobkit import T0, spec_dict

from finetune_operator.api import (
    SpecError,
    TrainingJobSpec,
    TrainingJobStatus,
    parse_spec,
    parse_status,
    status_to_dict,
)


def test_defaults_match_the_contract():
    spec = parse_spec(spec_dict())
    assert spec.method == "LoRA" and spec.workers == 1 and spec.suspend is False
    assert (spec.lora.r, spec.lora.alpha, spec.lora.dropout, spec.lora.target_modules) == (
        8, 16, 0.05, ["q_proj", "v_proj"])
    hp = spec.hyperparameters
    assert (hp.learning_rate, hp.batch_size, hp.gradient_accumulation_steps, hp.sequence_length, hp.seed) == (
        2e-4, 8, 1, 512, 42)
    assert (spec.resources.gpus, spec.resources.cpu, spec.resources.memory) == (1, None, None)
    assert (spec.checkpoint.claim_name, spec.checkpoint.mount_path, spec.checkpoint.every_steps,
            spec.checkpoint.keep) == (None, "/checkpoints", 100, 3)
    rp = spec.run_policy
    assert (rp.backoff_limit, rp.max_resumes, rp.active_deadline_seconds, rp.stall_timeout_seconds,
            rp.start_timeout_seconds, rp.ttl_seconds_after_finished, rp.auto_resume, rp.backoff_seconds,
            rp.max_backoff_seconds, rp.termination_grace_period_seconds) == (
        3, 10, None, None, 600, None, True, 10, 300, 120)
    assert spec.dataset.text_field == "text"


def test_camel_case_aliases_and_snake_case_names_both_validate():
    by_alias = parse_spec(spec_dict(runPolicy={"backoffLimit": 7}, dataset={"textField": "body"}))
    by_name = TrainingJobSpec.model_validate(
        {**spec_dict(), "run_policy": {"backoff_limit": 7}, "dataset": {"path": "/d", "text_field": "body"}})
    assert by_alias.run_policy.backoff_limit == by_name.run_policy.backoff_limit == 7
    dumped = by_alias.model_dump(exclude_none=True)
    assert dumped["runPolicy"]["backoffLimit"] == 7 and "run_policy" not in dumped


@pytest.mark.parametrize(
    "extra, path",
    [
        ({"lora": {"r": 0}}, "spec.lora.r"),
        ({"lora": {"r": 1025}}, "spec.lora.r"),
        ({"lora": {"dropout": 1.5}}, "spec.lora.dropout"),
        ({"resources": {"gpus": 65}}, "spec.resources.gpus"),
        ({"runPolicy": {"backoffLimit": 101}}, "spec.runPolicy.backoffLimit"),
        ({"image": "  "}, "spec.image"),
        ({"model": ""}, "spec.model"),
        ({"dataset": {"path": ""}}, "spec.dataset.path"),
        ({"workers": 1025}, "spec.workers"),
        ({"hyperparameters": {"maxSteps": None}}, "spec.hyperparameters"),
        ({"resources": {"memory": "lots"}}, "spec.resources.memory"),
        ({"failurePolicy": {"rules": [{"action": "Fail"}]}}, "spec.failurePolicy.rules[0]"),
        ({"runPolicy": {"backoffSeconds": 50, "maxBackoffSeconds": 10}}, "spec.runPolicy"),
        ({"method": "Full"}, "spec.method"),
    ],
)
def test_invalid_specs_raise_one_line_spec_errors_naming_the_field(extra, path):
    with pytest.raises(SpecError) as caught:
        parse_spec(spec_dict(**extra))
    assert caught.value.field == path
    assert caught.value.message.startswith(path + ":")
    assert "\n" not in caught.value.message


def test_fields_of_a_newer_crd_are_ignored_not_refused():
    """The API server prunes what its CRD does not know and fills in its defaults: a field the
    operator does not know comes from a newer CRD (mid-upgrade) and must not fail the job."""
    spec = parse_spec(spec_dict(futureKnob={"on": True}, lora={"r": 4, "newOption": 1},
                                failurePolicy={"rules": [{"action": "Fail", "onExitCodes": {
                                    "operator": "In", "values": [3]}, "later": 1}]}))
    assert spec.lora.r == 4 and spec.failure_policy.rules[0].action == "Fail"
    with pytest.raises(SpecError, match=r"spec\.lora\.r") as caught:
        parse_spec(spec_dict(futureKnob=1, lora={"r": 0}))  # a real error still fails, naming the field
    assert "futureKnob" not in caught.value.message


def test_multi_node_jobs_parse():
    assert parse_spec(spec_dict(workers=4)).workers == 4


def test_hyperparameters_need_steps_or_epochs():
    with pytest.raises(SpecError, match="set maxSteps or epochs"):
        parse_spec({**spec_dict(), "hyperparameters": {"learningRate": 0.1}})
    assert parse_spec({**spec_dict(), "hyperparameters": {"epochs": 1.5}}).hyperparameters.epochs == 1.5


def test_missing_spec_is_a_spec_error():
    with pytest.raises(SpecError):
        parse_spec(None)


def test_quantities_accept_integers_like_the_apiserver():
    spec = parse_spec(spec_dict(resources={"cpu": 4, "memory": "32Gi"}))
    assert (spec.resources.cpu, spec.resources.memory) == ("4", "32Gi")


def test_failure_policy_rule_needs_exactly_one_matcher():
    both = {"action": "Fail", "onExitCodes": {"operator": "In", "values": [1]},
            "onPodConditions": [{"type": "DisruptionTarget"}]}
    with pytest.raises(SpecError, match="exactly one of onExitCodes or onPodConditions"):
        parse_spec(spec_dict(failurePolicy={"rules": [both]}))


def test_free_form_template_fields_are_kept():
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    spec = parse_spec(spec_dict(template={"tolerations": tolerations, "affinity": {"nodeAffinity": {"x": 1}}}))
    assert spec.template.tolerations == tolerations
    assert spec.template.affinity == {"nodeAffinity": {"x": 1}}


def test_parse_status_tolerates_junk_and_keeps_good_fields():
    status = parse_status({"phase": "Running", "attempt": 3, "resumes": 2, "failures": "many", "extra": 1})
    assert (status.phase, status.attempt, status.resumes, status.failures) == ("Running", 3, 2, 0)
    assert parse_status(None) == TrainingJobStatus()
    assert parse_status({"phase": "Exploded"}).phase is None
    # past the schema's bound (written around validation): dropped, so +1 cannot overflow int64
    assert parse_status({"phase": "Running", "attempt": 2**63 - 1}).attempt == 0


def test_status_dump_uses_camel_case_and_rfc3339_seconds():
    status = TrainingJobStatus(phase="Running", attempt=2, start_time=T0.replace(microsecond=123))
    assert status_to_dict(status) == {
        "phase": "Running", "conditions": [], "attempt": 2, "failures": 0, "resumes": 0, "restarts": 0,
        "startTime": "2025-01-01T00:00:00Z",
    }


def test_naive_times_read_as_utc():
    status = parse_status({"startTime": "2025-01-01T00:00:00"})
    assert status.start_time == T0


def test_parse_phase_reads_the_phase_as_parse_status_does():
    from finetune_operator.api import parse_phase

    for raw in ({"phase": "Running", "attempt": 2}, {"phase": "Exploded"}, {"phase": 3}, {}, None, "junk",
                {"phase": "Failed", "attempt": -5}):
        assert parse_phase(raw) == parse_status(raw).phase, raw
