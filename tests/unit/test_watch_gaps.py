"""The watch-gap audit's bookkeeping: which index entries a LIST proves deleted."""
from __future__ import annotations

from finetune_operator.config import OperatorConfig
from finetune_operator.core.observation import PodObservation
from finetune_operator.reconciler import Reconciler
from finetune_operator.watch_gaps import vanished


def pod(uid: str, rv: int) -> dict:
    return {"metadata": {"uid": uid, "name": f"p-{uid}", "resourceVersion": str(rv)}}


def test_only_entries_older_than_the_list_and_absent_from_it_are_gone():
    indexed = [(("ns", "a"), [pod("listed", 5), pod("deleted", 5), pod("newer", 11)]),
               (("ns", "b"), [pod("kept", 9)])]
    assert vanished(indexed, listed_uids={"listed", "kept"}, listed_at=10) == {("ns", "a"): {"deleted"}}


def test_an_entry_at_exactly_the_list_version_counts_as_seen_by_it():
    assert vanished([("k", [pod("x", 10)])], set(), 10) == {"k": {"x"}}
    assert vanished([("k", [pod("x", 10)])], set(), 9) == {}


def test_vanished_pods_are_hidden_from_their_job_and_come_back_never():
    r = Reconciler(client=None, config=OperatorConfig())
    r.bind({("ns", "a"): [pod("1", 3), pod("2", 4)]}, {})
    r.pods_vanished({("ns", "a"): {"1"}})  # the job is not cached: no reconcile is triggered
    assert [p["metadata"]["uid"] for p in r.pods_of(("ns", "a"))] == ["2"]
    r.pods_vanished({})
    assert len(r.pods_of(("ns", "a"))) == 2  # the next audit found the entry (or it left the index)


def test_a_node_deleted_behind_the_watch_reads_as_gone():
    r = Reconciler(client=None, config=OperatorConfig())
    r.bind({}, {"n1": [{"ready": True, "since": None, "rv": 1}]})
    on_n1 = PodObservation(name="j-1", attempt=1, node_name="n1")
    assert r._unready_nodes([on_n1]) == {}
    r.nodes_vanished({"n1"})
    assert r._unready_nodes([on_n1]) == {"n1": None}
