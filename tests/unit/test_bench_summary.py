"""bench/summary.py: the median and spread of several bench.run results, each ratio taken
within its own run (the median of ratios, not the ratio of medians)."""
from __future__ import annotations

import json

import pytest

from bench.summary import main, summarize


def run(ours: float, job: float, extra: bool = True) -> dict:
    rows = [{"metric": "controller CPU (s)", "key": "cpu", "ours": ours, "job_controller": job,
             "ratio": ours / job}]
    if extra:
        rows.append({"metric": "lag (ms)", "key": "lag", "ours": float("nan"), "job_controller": None,
                     "ratio": None})
    return {"meta": {"jobs": 1000}, "table": rows}


def test_median_and_spread_of_each_side_and_of_the_per_run_ratios():
    text = summarize([run(1, 1), run(2, 4), run(3, 1)])
    cpu = next(line for line in text.splitlines() if line.startswith("| controller CPU"))
    # per-run ratios 1, 0.5, 3 -> median 1.00; the ratio of the medians (2 / 1) would say 2.00
    assert cpu == "| controller CPU (s) | 2.00 (1.00-3.00) | 1.00 (1.00-4.00) | 1.00 (0.50-3.00) |"


def test_rows_without_numbers_say_so_and_runs_missing_a_row_are_skipped():
    text = summarize([run(30, 10), run(20, 20, extra=False)])
    assert "| lag (ms) | n/a | n/a | n/a |" in text
    assert text.splitlines()[0] == "2 runs, N=1000: median (min-max)"


def test_runs_of_different_sizes_are_refused(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(run(1, 1)))
    other = run(1, 1)
    other["meta"]["jobs"] = 50
    b.write_text(json.dumps(other))
    with pytest.raises(SystemExit) as exc:
        main([str(a), str(b)])
    assert exc.value.code == 2
    assert "different N" in capsys.readouterr().err
