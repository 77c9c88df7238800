"""The torchrun launcher's choice of termination message from the ranks' reports (torch-free)."""

from __future__ import annotations

from finetune_trainer import contract as c
from finetune_trainer import launch


def _msg(outcome: str, text: str) -> dict:
    return c.termination_message(outcome, message=text)


def test_rank_reports_read_back_what_ranks_wrote(tmp_path):
    for rank, msg in {0: _msg("preempted", "stopped"), 1: _msg("config_error", "dataset is empty")}.items():
        (tmp_path / f"rank-{rank}.json").write_text(c.encode_termination_message(msg))
    (tmp_path / "rank-x.json").write_text("{}")
    (tmp_path / "rank-2.json").write_text("not json")
    reports = launch.rank_reports(str(tmp_path))
    assert sorted(reports) == [0, 1]
    assert reports[1]["message"] == "dataset is empty"
    assert launch.rank_reports(str(tmp_path / "missing")) == {}


def test_the_rank_whose_outcome_matches_the_exit_code_is_reported():
    reports = {0: _msg("preempted", "stopped by SIGTERM before training started"),
               1: _msg("config_error", "dataset is empty"), 2: _msg("config_error", "later rank")}  # fmt: skip
    assert launch.pick_report(78, reports)["message"] == "dataset is empty"
    assert launch.pick_report(143, reports)["outcome"] == "preempted"
    assert launch.pick_report(1, reports) is None


def test_exit_codes_map_to_outcomes():
    assert launch.outcome_for_exit(78) == c.OUTCOME_CONFIG_ERROR
    assert launch.outcome_for_exit(143) == c.OUTCOME_PREEMPTED
    assert launch.outcome_for_exit(137) == c.OUTCOME_PREEMPTED
    assert launch.outcome_for_exit(1) == c.OUTCOME_ERROR
    assert launch.exit_code_for_failures({0: -15, 1: 78}) == 78
