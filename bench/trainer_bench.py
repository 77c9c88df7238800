"""Trainer micro-benchmark on CPU with the tiny random Llama (no GPU, no hub).

Prints:
- import time of the training stack (``import finetune_trainer.training`` in a fresh process),
- steps/s of the tiny model through our trainer (in-process, no checkpoints in the window),
- SIGTERM-to-exit time of a running trainer subprocess (checkpoint save included),
- metrics endpoint overhead: step time with the metrics server (scraped at 10 Hz) / without.

Usage: .venv/bin/python bench/trainer_bench.py [--steps 60] [--repeats 3] [--json]
"""

from __future__ import annotations

import os

from finetune_testbed.trainer_fixtures import quiet_offline_env

quiet_offline_env()

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def import_time(repeats: int) -> float:
    code = "import time; t=time.perf_counter(); import finetune_trainer.training; print(time.perf_counter()-t)"
    times = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter())

        def step_seconds(self, skip: int = 3) -> float:
            t = self.times[skip:]
            return (t[-1] - t[0]) / (len(t) - 1)

    return StepTimer()


def one_run(tmp: Path, model: str, data: str, steps: int, with_metrics: bool) -> float:
    """Seconds per step (median-free mean over steps after warm-up) of one in-process run."""
    import finetune_contract as c
    from finetune_trainer import data as d
    from finetune_trainer import training
    from finetune_trainer.metrics import TrainerMetrics
    from finetune_trainer.worker import Report, StopSignal

    out = tempfile.mkdtemp(dir=tmp)
    cfg = c.TrainerConfig(
        model=model, dataset=data, output_dir=out, max_steps=steps, save_steps=10 * steps,
        batch_size=4, seq_len=48, seed=7, metrics_port=0, metrics_addr="127.0.0.1", termination_log="",
    )  # fmt: skip
    metrics, stop_scrape, scraper = None, threading.Event(), None
    if with_metrics:
        metrics = TrainerMetrics()
        port = metrics.serve(0, "127.0.0.1", port_file_dir=out)

        def scrape_loop():
            while not stop_scrape.wait(0.1):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()

        scraper = threading.Thread(target=scrape_loop, daemon=True)
        scraper.start()
    timer = _step_timer()
    try:
        training.train(cfg, model, d.prepare(cfg), StopSignal(), Report(cfg, False), metrics, [timer])
    finally:
        stop_scrape.set()
        if scraper:
            scraper.join()
        if metrics:
            metrics.close()
    return timer.step_seconds()


def sigterm_to_exit(tmp: Path, model: str, data: str) -> tuple[float, int, int]:
    """(seconds from SIGTERM to process exit, exit code, checkpoint step)."""
    import finetune_contract as c

    out = Path(tempfile.mkdtemp(dir=tmp))
    env = {
        **os.environ,
        c.ENV_MODEL: model, c.ENV_DATASET: data, c.ENV_OUTPUT_DIR: str(out / "out"),
        c.ENV_TERMINATION_LOG: str(out / "tl"), c.ENV_METRICS_PORT: "0", c.ENV_METRICS_ADDR: "127.0.0.1",
        c.ENV_MAX_STEPS: "100000", c.ENV_SAVE_STEPS: "100000", c.ENV_BATCH_SIZE: "4", c.ENV_SEQ_LEN: "48",
    }  # fmt: skip
    log = out / "log"
    with open(log, "wb") as fh:
        p = subprocess.Popen([sys.executable, "-m", "finetune_trainer"], env=env, stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while "step 5/" not in log.read_text(errors="replace"):
            if p.poll() is not None or time.monotonic() > deadline:
                p.kill()
                raise RuntimeError("trainer did not reach step 5:\n" + log.read_text(errors="replace")[-3000:])
            time.sleep(0.01)
        t0 = time.perf_counter()
        p.send_signal(signal.SIGTERM)
        rc = p.wait(120)
        took = time.perf_counter() - t0
    msg = json.loads((out / "tl").read_text())
    return took, rc, msg.get("checkpointStep") or -1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="also print one JSON line")
    a = ap.parse_args()

    from transformers.utils import logging as hf_logging

    from finetune_testbed.trainer_fixtures import build_tiny_model, text_dataset

    hf_logging.disable_progress_bar()
    results: dict[str, float] = {}
    results["import_seconds"] = import_time(a.repeats)
    print(f"import finetune_trainer.training: {results['import_seconds']:.2f} s (median of {a.repeats})", flush=True)

    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        model = build_tiny_model(str(tmp / "model"))
        data = text_dataset(str(tmp / "train.jsonl"), n=400)
        with_m, without_m = [], []
        for _ in range(a.repeats):  # interleaved, so drift on a shared machine hits both
            without_m.append(one_run(tmp, model, data, a.steps, with_metrics=False))
            with_m.append(one_run(tmp, model, data, a.steps, with_metrics=True))
        base, withm = statistics.median(without_m), statistics.median(with_m)
        results["steps_per_second"] = 1.0 / base
        results["step_ms"] = base * 1000
        results["metrics_overhead_ratio"] = withm / base
        print(
            f"tiny model (batch 4, seq <= 48, LoRA r=8): {1 / base:.1f} steps/s ({base * 1000:.1f} ms/step, "
            f"median of {a.repeats} x {a.steps} steps)",
            flush=True,
        )
        print(
            f"metrics endpoint overhead: step time with/without = {withm * 1000:.2f}/{base * 1000:.2f} ms "
            f"= {withm / base:.3f} (server scraped at 10 Hz)",
            flush=True,
        )
        sig = [sigterm_to_exit(tmp, model, data) for _ in range(a.repeats)]
        took = statistics.median(s[0] for s in sig)
        results["sigterm_to_exit_seconds"] = took
        print(
            f"SIGTERM -> exit: {took:.2f} s median (runs: "
            + ", ".join(f"{t:.2f}s rc={rc} checkpoint-{st}" for t, rc, st in sig)
            + ")",
            flush=True,
        )
    if a.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
