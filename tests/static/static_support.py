"""Helpers shared by the static tests (plain module; the fixtures live in conftest.py)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MONITORING = DEPLOY / "monitoring"
OPERATOR_NAMESPACE = "finetune-system"


def run(cmd: list[str], *, timeout: float = 300, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Runs a command in the repository root; fails the test with its output when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=kw.pop("cwd", ROOT), **kw)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                    f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def venv_tool(name: str) -> str | None:
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    return shutil.which(name)


def install_tool(tool: str) -> dict[str, str]:
    """hack/install-tools.sh <tool>: installs when missing, prints "<name> <path>" lines."""
    proc = run(["bash", str(ROOT / "hack/install-tools.sh"), tool], timeout=900)
    paths = {}
    for line in proc.stdout.splitlines():
        name, _, path = line.partition(" ")
        if path:
            paths[name] = path
    return paths


def kustomize_build(kubectl: str, path: Path) -> tuple[str, list[dict[str, Any]]]:
    text = run([kubectl, "kustomize", str(path)], timeout=120).stdout
    return text, [d for d in yaml.safe_load_all(text) if d is not None]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o.get("kind") == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]
