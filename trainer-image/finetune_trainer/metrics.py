"""Prometheus metrics of the trainer (torch-free), on their own CollectorRegistry."""

from __future__ import annotations

import os
import threading
import time
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Gauge, start_http_server

import finetune_contract as c

from .util import atomic_write_text


class TrainerMetrics:
    """The contract's gauges. Only rank 0 creates one and serves it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.step = Gauge(c.METRIC_STEP, "Optimizer steps completed (global step)", registry=r)
        self.total_steps = Gauge(c.METRIC_TOTAL_STEPS, "Steps this run trains to", registry=r)
        self.epoch = Gauge(c.METRIC_EPOCH, "Fractional epoch", registry=r)
        self.loss = Gauge(c.METRIC_LOSS, "Training loss of the last logged step", registry=r)
        self.tokens_per_second = Gauge(
            c.METRIC_TOKENS_PER_SECOND,
            "Non-padding input tokens per second over the last logging interval (all ranks)",
            registry=r,
        )
        self.last_checkpoint_step = Gauge(
            c.METRIC_LAST_CHECKPOINT_STEP, "Step of the latest complete checkpoint", registry=r
        )
        self.eval_loss = Gauge(c.METRIC_EVAL_LOSS, "Loss on the eval split at the latest evaluation", registry=r)
        self.eval_loss.set(float("nan"))  # no evaluation yet (or no eval split): not a loss of 0
        self.heartbeat = Gauge(
            c.METRIC_HEARTBEAT,
            "Unix time of the last completed step (advances only when steps advance)",
            registry=r,
        )
        self.server: WSGIServer | None = None
        self.port: int | None = None
        self._last_step = -1

    # -- updates ------------------------------------------------------------------------
    def on_step(self, step: int, epoch: float | None = None) -> None:
        self.step.set(step)
        if epoch is not None:
            self.epoch.set(epoch)
        if step != self._last_step:
            self._last_step = step
            self.heartbeat.set(time.time())

    # -- server -------------------------------------------------------------------------
    def serve(self, port: int, addr: str = "0.0.0.0", port_file_dir: str | None = None) -> int:
        """Start the HTTP server; port 0 picks a free one. Returns the port served on.

        The port is also written to ``<port_file_dir>/metrics-port`` when given.
        """
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)  # shutdown() ends the thread
        self.server = server
        self.port = int(server.server_port)
        if port_file_dir:
            os.makedirs(port_file_dir, exist_ok=True)
            atomic_write_text(os.path.join(port_file_dir, c.METRICS_PORT_FILE), f"{self.port}\n")
        return self.port

    def close(self, wait: bool = True) -> None:
        """Stop serving. ``shutdown`` waits up to the server's 0.5 s poll interval;
        ``wait=False`` does that in a daemon thread (used on the exit path)."""
        server, self.server = self.server, None
        if server is None:
            return

        def _stop() -> None:
            server.shutdown()
            server.server_close()

        if wait:
            _stop()
        else:
            threading.Thread(target=_stop, name="metrics-close", daemon=True).start()
