"""`python -m bench.summary A.json B.json C.json`: the median and (min-max) of several
`bench.run` results, each row's ratio taken within its own run (so drift between runs hits
both sides of a ratio alike). Prints a Markdown table (bench/README.md carries them)."""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path


def _finite(values: list) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def spread(values: list) -> str:
    vals = _finite(values)
    if not vals:
        return "n/a"
    digits = 2 if max(abs(v) for v in vals) < 100 else 0
    med, lo, hi = statistics.median(vals), min(vals), max(vals)
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def summarize(runs: list[dict]) -> str:
    """One row per metric of the first run, in its order; runs lacking a row add nothing to it."""
    by_key = [{row["key"]: row for row in run["table"]} for run in runs]
    lines = [f"{len(runs)} run{'s' if len(runs) > 1 else ''}, N={runs[0]['meta']['jobs']}: median (min-max)", "",
             "| metric | ours | Job ctrl | ratio ours/Job |", "|---|---|---|---|"]
    for row in runs[0]["table"]:
        per_run = [rows[row["key"]] for rows in by_key if row["key"] in rows]
        cells = [spread([r.get(side) for r in per_run]) for side in ("ours", "job_controller", "ratio")]
        lines.append(f"| {row['metric']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="bench-*.json files written by bench.run")
    args = parser.parse_args(argv)
    runs = [json.loads(p.read_text()) for p in args.results]
    if len({run["meta"]["jobs"] for run in runs}) > 1:
        parser.error("the runs have different N (--jobs); summarize runs of one size")
    print(summarize(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
