"""Small torch-free helpers."""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from typing import NoReturn

LOG = logging.getLogger("finetune_trainer")


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file + fsync + rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def flush_and_exit(code: int) -> NoReturn:
    """Flush stdout/stderr, then end the process at once (no interpreter teardown: torch's
    takes seconds, which would only eat into the pod's grace period)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # broad on purpose: a closed or broken stream must not stop the exit
            pass
    os._exit(code)


def exit_with_stacks(code: int, why: str, before_exit: Callable[[], object] | None = None) -> NoReturn:
    """A watchdog's last word: log why, print every thread's stack (where it hung), run
    ``before_exit`` (e.g. write the termination message), end the process."""
    LOG.error("%s; thread stacks follow", why)
    try:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if before_exit is not None:
            before_exit()
    finally:
        flush_and_exit(code)


def setup_logging(rank: int = 0) -> None:
    """One readable line per record on stdout (``kubectl logs``)."""
    root = logging.getLogger("finetune_trainer")
    if getattr(root, "_ft_configured", False):
        return
    handler = logging.StreamHandler(sys.stdout)
    prefix = "" if rank == 0 else f"[rank {rank}] "
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s", "%Y-%m-%dT%H:%M:%S")
    )
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
    root._ft_configured = True  # type: ignore[attr-defined]
    # bitsandbytes warns about an optional CPU kernel package on every import (docs/TRAINER.md pitfall 11)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def env_rank() -> int:
    """Global rank from the environment torchrun sets (0 when absent)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0

