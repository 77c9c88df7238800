"""The operator's version. One source: `[project].version` in operator/pyproject.toml, read
here from the installed distribution's metadata (pip writes it into the dist-info; the image
ships a dist-info for its copied sources). Shown by `--version`, the start-up log line and the
`finetune_operator_build_info` metric (docs/CONTRACTS.md, "Operator metrics")."""
from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "finetune-operator"
# Sources run without their distribution installed have no version to report; saying so
# beats crashing an operator over a label (the start-up log line shows it).
UNKNOWN = "0.0.0+unknown"


def _installed_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return UNKNOWN


__version__ = _installed_version()
PYTHON_VERSION = platform.python_version()


def describe() -> str:
    """One line for --version and the start-up log."""
    return f"finetune-operator {__version__} (Python {PYTHON_VERSION})"
