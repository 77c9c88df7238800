"""Run the trainer in this process, or under torchrun (``torch.distributed.run``).

torchrun itself exits 1 after SIGTERM (docs/TRAINER.md pitfall 9); here ``SignalException`` is
mapped to 128+signum (143 for SIGTERM) and a worker's 78/143 is passed through, so the
operator's failure policy sees the same exit codes in both modes.

torchrun options come from the ``PET_*`` variables (PET_NNODES, PET_NODE_RANK,
PET_MASTER_ADDR, PET_MASTER_PORT, PET_RDZV_*); processes per node from FT_NPROC_PER_NODE
(0/"auto" = one per visible GPU). A single node without a master address or rendezvous
endpoint runs ``--standalone`` (a free local port).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import sys
import tempfile
import threading

import finetune_contract as c

from . import checkpoints as ckpts
from .util import LOG, exit_with_stacks, setup_logging


def is_torchrun_worker(env: os._Environ | dict | None = None) -> bool:
    env = os.environ if env is None else env
    return "LOCAL_RANK" in env and "WORLD_SIZE" in env


def resolve_nproc(cfg: c.TrainerConfig) -> int:
    if cfg.nproc_per_node and cfg.nproc_per_node > 0:
        return cfg.nproc_per_node
    try:  # auto: one per visible GPU
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:  # broad on purpose: no usable torch/CUDA means one process
        return 1


def _nnodes(env) -> str:
    return (env.get("PET_NNODES") or "1").strip()


def needs_torchrun(cfg: c.TrainerConfig, env=None) -> bool:
    env = os.environ if env is None else env
    if is_torchrun_worker(env):
        return False
    return resolve_nproc(cfg) > 1 or _nnodes(env) not in ("1", "1:1")


def torchrun_args(nproc: int, argv: list[str], env=None) -> list[str]:
    env = os.environ if env is None else env
    args = ["--nproc-per-node", str(nproc)]
    standalone = _nnodes(env) in ("1", "1:1") and not (
        env.get("PET_MASTER_ADDR") or env.get("PET_RDZV_ENDPOINT") or env.get("PET_STANDALONE")
    )
    if standalone:
        args.append("--standalone")
    return args + ["--module", "finetune_trainer", *argv]


def exit_code_for_failures(exitcodes: dict[int, int]) -> int:
    """Exit code of the launcher when workers failed: rank 0's (or the lowest rank's)
    78 / 128+n passes through, anything else is 1."""
    if not exitcodes:
        return c.EXIT_ERROR
    ordered = [exitcodes[r] for r in sorted(exitcodes)]
    for code in ordered:
        if code == c.EXIT_CONFIG_ERROR:
            return code
    first = ordered[0]
    if 128 < first < 160:
        return first
    return c.EXIT_ERROR


_PR_SET_PDEATHSIG = 1


def die_with_launcher(env=None) -> None:
    """In a torchrun worker: SIGKILL when the launcher dies (torchrun starts workers in
    their own sessions, so killing the launcher's process group leaves them behind)."""
    env = os.environ if env is None else env
    launcher = env.get(c.ENV_LAUNCHER_PID)
    if not launcher or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError) as e:
        LOG.warning("cannot tie this worker to its launcher: %s", e)
        return
    if str(os.getppid()) != launcher:  # the launcher died before prctl took effect
        os._exit(c.EXIT_ERROR)


def rank_reports(directory: str) -> dict[int, dict]:
    """rank -> termination message the rank left in ``directory``."""
    out: dict[int, dict] = {}
    try:
        names = os.listdir(directory)
    except OSError:
        return out
    for name in names:
        if not (name.startswith("rank-") and name.endswith(".json")):
            continue
        try:
            rank = int(name[len("rank-") : -len(".json")])
        except ValueError:
            continue
        msg = c.parse_termination_message(_read(os.path.join(directory, name)) or "")
        if msg is not None:
            out[rank] = msg
    return out


def outcome_for_exit(rc: int) -> str:
    if rc == c.EXIT_CONFIG_ERROR:
        return c.OUTCOME_CONFIG_ERROR
    return c.OUTCOME_PREEMPTED if rc > 128 else c.OUTCOME_ERROR


def pick_report(rc: int, reports: dict[int, dict]) -> dict | None:
    """The lowest rank's message whose outcome matches the launcher's exit code."""
    want = outcome_for_exit(rc)
    for rank in sorted(reports):
        if reports[rank]["outcome"] == want:
            return reports[rank]
    return None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError:
        return None


def precheck(cfg: c.TrainerConfig) -> None:
    """Cheap, torch-free checks before spawning workers (they repeat the full ones)."""
    from .data import dataset_files
    from .worker import check_model_path

    problems = cfg.problems()
    if problems:
        raise c.ConfigError("; ".join(problems))
    dataset_files(cfg.dataset)
    check_model_path(cfg.model)
    if cfg.resume_from:
        ckpts.explicit_start(cfg.resume_from)


def run_torchrun(cfg: c.TrainerConfig, argv: list[str]) -> int:
    setup_logging(0)
    try:
        precheck(cfg)
    except c.ConfigError as e:
        reason = c.one_line(str(e))
        LOG.error("configuration error: %s", reason)
        c.write_termination_message(
            cfg.termination_log, c.termination_message(c.OUTCOME_CONFIG_ERROR, max_steps=cfg.max_steps, message=reason)
        )
        return c.EXIT_CONFIG_ERROR
    nproc = resolve_nproc(cfg)
    report_dir = _prepare_env(cfg, nproc)
    before = _read(cfg.termination_log)
    args = torchrun_args(nproc, argv)
    LOG.info("launching torchrun %s", " ".join(args))
    returned = threading.Event()
    threading.Thread(
        target=_bound_after_completion, args=(cfg, before, returned), name="completion-bound", daemon=True
    ).start()
    try:
        rc, detail = _run_agent(args)
        returned.set()
        if rc != 0:
            _report_failure(cfg, rc, detail, before, rank_reports(report_dir) if report_dir else {})
    finally:
        if report_dir:
            shutil.rmtree(report_dir, ignore_errors=True)
    if rc != 0:
        LOG.warning("torchrun finished with exit code %d (%s)", rc, detail)
    return rc


def _prepare_env(cfg: c.TrainerConfig, nproc: int) -> str | None:
    """The agent's and the workers' environment; returns the directory for the ranks' reports, if any."""
    env = os.environ
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # docs/TRAINER.md pitfall 11
    # The workers end themselves FT_STOP_TIMEOUT_SECONDS after SIGTERM; the agent waits a
    # little longer before its SIGKILL (its default, 30 s, can cut a save short).
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(cfg.stop_timeout + 5)
    env[c.ENV_LAUNCHER_PID] = str(os.getpid())
    report_dir = _report_dir()
    if report_dir:
        env[c.ENV_RANK_REPORT_DIR] = report_dir
    return report_dir


# Once rank 0 has reported "completed" (adapter saved, process group torn down), torchrun
# gets this long to return; a launcher that hangs past it would hold the pod's GPUs forever.
COMPLETION_GRACE_SECONDS = 30.0
# How often the launcher looks at the termination log for rank 0's "completed".
COMPLETION_POLL_SECONDS = 5.0


def _bound_after_completion(cfg: c.TrainerConfig, before: str | None, returned: threading.Event) -> None:
    """Exit 0 (stacks dumped) when torchrun has not returned COMPLETION_GRACE_SECONDS after
    rank 0 wrote a "completed" termination message. The workers die with the launcher."""
    while not returned.wait(COMPLETION_POLL_SECONDS):
        text = _read(cfg.termination_log)
        msg = c.parse_termination_message(text or "") if text != before else None
        if msg is None or msg["outcome"] != c.OUTCOME_COMPLETED:
            continue
        if returned.wait(COMPLETION_GRACE_SECONDS):
            return
        exit_with_stacks(
            c.EXIT_COMPLETED,
            f"training completed but torchrun did not return within {COMPLETION_GRACE_SECONDS:.0f}s: exiting 0",
        )


def _report_dir() -> str | None:
    try:
        return tempfile.mkdtemp(prefix="finetune-ranks-")
    except OSError as e:  # e.g. no writable temporary directory: rank 0's message only
        LOG.warning("no directory for the ranks' reports: %s", e)
        return None


def _run_agent(args: list[str]) -> tuple[int, str]:
    """torchrun in this process → (exit code, one-line detail on failure)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(args)
        return 0, ""
    except SignalException as e:
        return 128 + int(e.sigval), f"launcher received {getattr(e.sigval, 'name', e.sigval)}"
    except ChildFailedError as e:
        codes = {int(r): int(f.exitcode) for r, f in e.failures.items()}
        detail = "workers failed: " + ", ".join(f"rank {r} exit {x}" for r, x in sorted(codes.items()))
        return exit_code_for_failures(codes), detail
    except Exception as e:  # broad on purpose: e.g. rendezvous errors
        return c.EXIT_ERROR, f"torchrun failed: {type(e).__name__}: {e}"


def _report_failure(cfg: c.TrainerConfig, rc: int, detail: str, before: str | None, reports: dict[int, dict]) -> None:
    """Make the termination message agree with the exit code.

    Kept: rank 0's own message when its outcome matches. Otherwise the first rank whose
    outcome matches (a config error found by rank 1 while rank 0 was torn down), else a
    message built here from the latest complete checkpoint.
    """
    now = _read(cfg.termination_log)
    written = c.parse_termination_message(now or "") if now != before else None
    want = outcome_for_exit(rc)
    if written is not None and written["outcome"] == want:
        return
    chosen = pick_report(rc, reports)
    if chosen is None:
        latest = ckpts.latest_complete_checkpoint(cfg.effective_checkpoint_dir)
        chosen = c.termination_message(
            want,
            step=latest.step if latest else 0,
            max_steps=cfg.max_steps,
            checkpoint=latest.path if latest else None,
            checkpoint_step=latest.step if latest else None,
            message=detail or f"exit {rc}",
        )
    else:
        LOG.info("reporting the failing rank's message: %s", chosen["message"])
    c.write_termination_message(cfg.termination_log, chosen)


def main(cfg: c.TrainerConfig, argv: list[str]) -> int:
    if needs_torchrun(cfg):
        return run_torchrun(cfg, argv)
    from . import worker

    return worker.run(cfg)

