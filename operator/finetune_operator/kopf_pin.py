"""The kopf release the operator's replacements of kopf internals were read against
(kopf_barrier.py, json_codec.py); operator/pyproject.toml pins it. A different kopf refuses
to start: its internals may have moved, and a silently ineffective patch is worse."""
from __future__ import annotations

import importlib.metadata

KOPF_VERSION = "1.45.2"


def require(patch: str, reread: str) -> None:
    """Raise unless the installed kopf is KOPF_VERSION; `reread` names what to read again."""
    version = importlib.metadata.version("kopf")
    if version != KOPF_VERSION:
        raise RuntimeError(f"finetune_operator.{patch} was written for kopf {KOPF_VERSION}, "
                           f"found {version}: re-read {reread} and update it")
