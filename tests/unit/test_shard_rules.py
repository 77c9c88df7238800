"""Sharding by label (operator/finetune_operator/sharding.py, docs/SHARDING.md): which jobs and pods
a replica selects, its Lease, the flags, and the shard label its pods carry."""
from __future__ import annotations

import pytest

from finetune_operator.api import parse_spec
from finetune_operator.config import parse_args
from finetune_operator.pods import build_pod
from finetune_operator.sharding import LABEL_SHARD, Shard, foreign_pods, with_shard_label

POD_SELECTOR = "app.kubernetes.io/managed-by=finetune-operator"


def obj(shard: str | None = None, uid: str | None = None, owner: str | None = None) -> dict:
    meta: dict = {"labels": {"x": "y", **({LABEL_SHARD: shard} if shard is not None else {})}}
    if uid:
        meta["uid"] = uid
    if owner:
        meta["ownerReferences"] = [{"uid": owner, "controller": True, "kind": "TrainingJob", "name": "j"}]
    return {"metadata": meta}


def test_named_shard_selects_its_label_only():
    s = Shard("a")
    assert s.selector() == f"{LABEL_SHARD}=a"
    assert s.pod_selector(POD_SELECTOR) == f"{POD_SELECTOR},{LABEL_SHARD}=a"
    assert s.owns(obj("a")) and not s.owns(obj("b")) and not s.owns(obj(None))
    assert s.lease_name("finetune-operator") == "finetune-operator-a"


def test_default_shard_selects_jobs_without_the_label():
    s = Shard(default=True)
    assert s.selector() == f"!{LABEL_SHARD}"
    assert s.pod_selector(POD_SELECTOR) == f"{POD_SELECTOR},!{LABEL_SHARD}"
    assert s.owns(obj(None)) and not s.owns(obj("a"))
    assert not s.owns(obj("")), "an empty value is a label: '!key' does not select it"
    assert s.lease_name("finetune-operator") == "finetune-operator-default"


def test_no_shard_is_todays_behaviour():
    s = Shard()
    assert not s.enabled and s.selector() is None
    assert s.pod_selector(POD_SELECTOR) == POD_SELECTOR
    assert s.owns(obj("a")) and s.owns(obj(None))
    assert s.lease_name("finetune-operator") == "finetune-operator"


def test_flags():
    assert Shard.of(parse_args(["--shard", "gpu-a"])) == Shard("gpu-a")
    assert Shard.of(parse_args(["--shard-default"])) == Shard(default=True)
    assert Shard.of(parse_args([])) == Shard()


@pytest.mark.parametrize("argv, words", [
    (["--shard", "default"], "--shard-default"),
    (["--shard", "GPU_a"], "must be a DNS label"),
    (["--shard", "a" * 64], "at most 63"),
    (["--shard", "a", "--shard-default"], "exclude each other"),
])
def test_bad_flags_are_refused_by_name(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--shard" in err and words in err


def test_shard_env_fallback(monkeypatch):
    monkeypatch.setenv("FINETUNE_SHARD", "b")
    assert parse_args([]).shard == "b"


def test_pods_carry_their_jobs_shard_label_and_no_other():
    assert with_shard_label({"a": "1", LABEL_SHARD: "t"}, "s") == {"a": "1", LABEL_SHARD: "s"}
    assert with_shard_label({"a": "1", LABEL_SHARD: "t"}, None) == {"a": "1"}
    spec = parse_spec({"image": "i", "model": "/m", "dataset": {"path": "/d.jsonl"},
                       "hyperparameters": {"maxSteps": 1},
                       "template": {"metadata": {"labels": {LABEL_SHARD: "from-template", "team": "x"}}}})
    pod = build_pod("j", "ns", "uid-1", spec, 1, trainer_env={}, shard="a")
    assert pod["metadata"]["labels"][LABEL_SHARD] == "a"
    assert pod["metadata"]["labels"]["team"] == "x"
    unlabelled = build_pod("j", "ns", "uid-1", spec, 1, trainer_env={})
    assert LABEL_SHARD not in unlabelled["metadata"]["labels"], "the default shard's pod watch would miss it"


def test_foreign_pods_are_the_jobs_pods_outside_this_shard():
    job = obj("b", uid="u1")
    pods = [obj("a", owner="u1"), obj("b", owner="u1"), obj("a", owner="other"), obj(None, owner="u1")]
    assert foreign_pods(pods, job, Shard("b")) == [pods[0], pods[3]]
    assert foreign_pods(pods, job, Shard()) == []


def test_a_job_relabelled_away_mid_reconcile_is_dropped_not_acted_on():
    """The old owner's status write fails (the relabel bumped the resourceVersion); the re-read
    job names another shard, so the step stops there: no second write, no pod (docs/SHARDING.md)."""
    import asyncio
    import copy

    from test_reconcile_step import FakeCluster, new_job

    from finetune_operator.config import OperatorConfig
    from finetune_operator.reconcile_step import Inputs, ReconcileStep

    def run(relabel_to: str | None):
        job = new_job()
        job["metadata"]["labels"] = {LABEL_SHARD: "a"}
        cluster = FakeCluster(copy.deepcopy(job))
        if relabel_to is not None:
            cluster.job["metadata"]["labels"] = {LABEL_SHARD: relabel_to}
            cluster._bump()
        remembered: list = []
        step = ReconcileStep(cluster, OperatorConfig(shard="a"))
        asyncio.run(step.run(job, Inputs(pods=lambda: []), remember=remembered.append))
        return cluster, remembered

    moved, remembered = run("b")
    assert moved.calls == [("conflict",), ("read",)] and remembered == [None]
    stayed, _ = run(None)
    assert ("create", "ft-1") in stayed.calls
    assert stayed.pods["ft-1"]["metadata"]["labels"][LABEL_SHARD] == "a"
