"""One version from one place: operator/pyproject.toml's [project].version is what
`--version` prints and what the build_info metric on the real /metrics endpoint carries."""
from __future__ import annotations

import asyncio
import platform
import subprocess
import sys
import tomllib

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from finetune_operator.health import HealthServer
from finetune_operator.kube import ApiState
from finetune_testbed.cluster import REPO
from finetune_testbed.procs import free_port


def pyproject_version() -> str:
    with open(REPO / "operator" / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def test_version_flag_prints_the_pyproject_version():
    out = subprocess.run([sys.executable, "-m", "finetune_operator", "--version"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == f"finetune-operator {pyproject_version()} (Python {platform.python_version()})"


def test_build_info_is_served_on_metrics_with_the_pyproject_version():
    async def scrape() -> str:
        server, port = HealthServer(ApiState()), free_port()
        await server.start("127.0.0.1", -1, port)
        try:
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert resp.status == 200
                return await resp.text()
        finally:
            await server.stop()

    families = {f.name: f for f in text_string_to_metric_families(asyncio.run(scrape()))}
    samples = families["finetune_operator_build_info"].samples
    assert [(s.labels, s.value) for s in samples] == [
        ({"version": pyproject_version(), "python": platform.python_version()}, 1.0)]
