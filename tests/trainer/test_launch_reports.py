"""The torchrun launcher's choice of termination message from the ranks' reports (torch-free)."""

from __future__ import annotations

import finetune_contract as c
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


_HUNG_AGENT = r"""
import sys, threading
import finetune_contract as c
from finetune_trainer import launch
launch.COMPLETION_GRACE_SECONDS = 1.0
cfg = c.TrainerConfig(termination_log=sys.argv[1])
before = launch._read(cfg.termination_log)
threading.Thread(target=launch._bound_after_completion, args=(cfg, before, threading.Event()), daemon=True).start()
c.write_termination_message(cfg.termination_log, c.termination_message(c.OUTCOME_COMPLETED, step=4, message="done"))
threading.Event().wait(60)  # torchrun that never returns
sys.exit(3)
"""


def test_launcher_exits_0_when_torchrun_hangs_after_training_completed(tmp_path):
    """Rank 0 reported "completed" but the agent never returns: the launcher ends itself (0)."""
    import subprocess
    import sys

    log = tmp_path / "tl"
    log.write_text("")
    proc = subprocess.run([sys.executable, "-c", _HUNG_AGENT, str(log)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torchrun did not return within 1s" in proc.stdout + proc.stderr
    assert c.parse_termination_message(log.read_text())["outcome"] == "completed"
