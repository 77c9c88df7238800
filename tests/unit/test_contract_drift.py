"""Both sides of the trainer contract read the same facts: what the trainer writes (its metrics,
its termination message, its exit codes) is what the operator's core understands. A rename on
either side fails here rather than turning progress into "unknown" or a preemption into a
counted failure."""

from __future__ import annotations

import json

from jobkit import T0, make_spec, observe
from prometheus_client import generate_latest

import finetune_contract as c
from finetune_operator.api import TrainingJobStatus
from finetune_operator.core import observe_pod
from finetune_operator.core.classify import Ended, classify_pod
from finetune_operator.core.trainer_metrics import parse_trainer_metrics
from finetune_operator.pods import build_pod
from finetune_operator.trainer_env import trainer_env
from finetune_trainer.metrics import TrainerMetrics


def test_operator_reads_every_metric_the_trainer_serves():
    m = TrainerMetrics()
    m.total_steps.set(100)
    m.epoch.set(0.5)
    m.loss.set(1.25)
    m.tokens_per_second.set(321.0)
    m.last_checkpoint_step.set(40)
    m.on_step(42, epoch=0.5)
    text = generate_latest(m.registry).decode()
    sample = parse_trainer_metrics(text)
    assert sample is not None
    assert (sample.step, sample.total_steps, sample.epoch, sample.loss) == (42, 100, 0.5, 1.25)
    assert (sample.tokens_per_second, sample.last_checkpoint_step) == (321.0, 40)
    assert sample.heartbeat_time is not None and not sample.loading
    assert {name for name in c.METRIC_NAMES if name in text} == set(c.METRIC_NAMES)


def test_pod_template_and_trainer_env_agree_on_paths_and_ports():
    spec = make_spec()
    env = trainer_env(spec)
    container = build_pod("job", "ns", "uid", spec, 0, trainer_env=env)["spec"]["containers"][0]
    assert container["terminationMessagePath"] == c.DEFAULT_TERMINATION_LOG == env[c.ENV_TERMINATION_LOG]
    assert [p["containerPort"] for p in container["ports"]] == [c.DEFAULT_METRICS_PORT]
    assert env[c.ENV_METRICS_PORT] == str(c.DEFAULT_METRICS_PORT)
    assert c.TrainerConfig.from_env(env).stop_timeout == c.stop_timeout_for_grace(
        spec.run_policy.termination_grace_period_seconds
    )


def _ended(exit_code: int, outcome: str | None) -> Ended:
    message = c.encode_termination_message(c.termination_message(outcome, step=3)) if outcome else "some log line"
    pod = {
        "metadata": {"name": "job-0", "namespace": "ns", "labels": {"finetune.dev/attempt": "0"}},
        "spec": {"nodeName": "n"},
        "status": {
            "phase": "Failed" if exit_code else "Succeeded",
            "containerStatuses": [{"name": "trainer", "state": {"terminated": {
                "exitCode": exit_code, "reason": "Error", "message": message,
                "finishedAt": T0.isoformat()}}}],
        },
    }
    observed = observe_pod(pod)
    outcome = classify_pod(observed, observe(pods=[observed]), make_spec(), TrainingJobStatus())
    assert isinstance(outcome, Ended), outcome
    return outcome


def test_trainer_exit_codes_and_outcomes_classify_as_the_contract_says():
    assert _ended(c.EXIT_PREEMPTED, None).kind == "interruption"
    assert _ended(c.EXIT_PREEMPTED, c.OUTCOME_PREEMPTED).kind == "interruption"
    assert _ended(c.EXIT_ERROR, c.OUTCOME_PREEMPTED).kind == "interruption"  # the trainer's word wins
    assert _ended(c.EXIT_CONFIG_ERROR, None).kind == "fatal"
    assert _ended(c.EXIT_ERROR, c.OUTCOME_CONFIG_ERROR).kind == "fatal"
    assert _ended(c.EXIT_ERROR, c.OUTCOME_ERROR).kind == "failure"
    assert set(c.OUTCOME_EXIT_CODES) == set(c.OUTCOMES)
    assert json.loads(c.encode_termination_message(c.termination_message(c.OUTCOME_ERROR)))["outcome"] == "error"
