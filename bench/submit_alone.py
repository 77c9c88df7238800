"""`python -m bench.submit_alone`: what submitting N owners costs the API server itself.

`make bench` submits while the controller under test works; on two shared cores the submit
row then measures the controller's load as much as the API server. Here, on a fresh
benchmark control plane (as `bench.run`: kwok nodes, no inflight limits), with 4 client
threads as `bench.run` uses: N TrainingJobs with no operator running, then N batch/v1 Jobs
with kube-controller-manager running (as in `make bench`), each in its own namespace after one
warm-up create (the quota evaluator's first load). Prints one line per kind."""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from . import controlplane, workload
from .run import paced

KINDS: dict[str, tuple[str, Callable[[str, str], dict]]] = {
    "TrainingJobs, no operator": ("/apis/finetune.dev/v1alpha1/namespaces/{ns}/trainingjobs",
                                  workload.trainingjob),
    "Jobs, kube-controller-manager running": ("/apis/batch/v1/namespaces/{ns}/jobs", workload.batch_job),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000, help="owners per kind (default 1000)")
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args(argv)
    cluster, _ = controlplane.new_cluster(math.ceil(args.jobs / 8) + 2)
    try:
        api = controlplane.start(cluster)
        with ThreadPoolExecutor(args.threads) as pool:
            for i, (kind, (path, manifest)) in enumerate(KINDS.items()):
                ns = f"submit-alone-{i}"
                controlplane.create_namespace(api, ns)
                url = path.format(ns=ns)
                api.create(url, manifest("warm-up", ns))
                bodies = [manifest(f"bj-{n:05d}", ns) for n in range(args.jobs)]
                t0 = time.monotonic()
                paced(pool, partial(api.create, url), bodies, None)  # as bench.run submits
                print(f"{kind}: {args.jobs} submitted in {time.monotonic() - t0:.1f}s", flush=True)
    finally:
        cluster.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
