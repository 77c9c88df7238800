"""The real node's cluster DNS: CoreDNS (built by hack/build-binaries.sh from hack/build/dns)
as a host process on the bridge address, answering `cluster.local` from the API server's
Services and EndpointSlices (docs/TESTBED.md, "The real node", "Cluster DNS").

    proc = start_coredns(bin_dir, workdir, log_dir, "10.244.0.1", kubeconfig)

Only `cluster.local` is served: nothing here can reach the internet, so there is no upstream
to forward other names to (CoreDNS refuses them)."""
from __future__ import annotations

from pathlib import Path

import requests

from .procs import Proc, free_port, wait_for

DOMAIN = "cluster.local"


def corefile(bind_ip: str, kubeconfig: Path, ready_port: int) -> str:
    # `ready` answers 200 once the kubernetes plugin has synced with the API server.
    return f"""{DOMAIN}:53 {{
    bind {bind_ip}
    ready 127.0.0.1:{ready_port}
    errors
    log
    kubernetes {DOMAIN} {{
        kubeconfig {kubeconfig}
    }}
}}
"""


def start_coredns(bin_dir: Path, workdir: Path, log_dir: Path, bind_ip: str,
                  kubeconfig: Path, timeout: float = 60) -> Proc:
    """CoreDNS on bind_ip:53 (udp and tcp), ready to answer; raises with its log tail if not."""
    binary = bin_dir / "coredns"
    if not binary.exists():
        raise RuntimeError(f"the real node needs {binary}: run `bash hack/build-binaries.sh`")
    ready_port = free_port()
    conf = workdir / "Corefile"
    conf.write_text(corefile(bind_ip, kubeconfig, ready_port))
    proc = Proc("coredns", [str(binary), "-conf", str(conf)], log_dir)
    proc.start()
    url = f"http://127.0.0.1:{ready_port}/ready"
    try:
        wait_for(lambda: requests.get(url, timeout=2).status_code == 200, timeout,
                 f"CoreDNS {url}", procs=[proc])
    except TimeoutError as exc:
        proc.stop()
        raise RuntimeError(f"{exc}; CoreDNS log tail ({proc.log_path}):\n{proc.log_tail()}") from exc
    return proc
