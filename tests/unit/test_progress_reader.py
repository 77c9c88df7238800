"""The operator's reader of a trainer's /metrics (finetune_operator/progress.py) against real
local HTTP servers: the trainer's own kind (prometheus_client's start_http_server), the test
bed's FakeTrainer, an error answer and a closed port; and when a silent trainer is read."""
from __future__ import annotations

import asyncio
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from finetune_operator.progress import UNANSWERED_EVERY, UNANSWERED_TRIES, ProgressReader, scrape_due
from finetune_testbed.prometheus import FakeTrainer


def _read(port: int, host: str = "127.0.0.1"):
    return asyncio.run(ProgressReader(2.0).read(host, port))


def test_reads_the_trainers_own_kind_of_endpoint():
    registry = CollectorRegistry()
    Gauge("finetune_trainer_step", "step", registry=registry).set(42)
    Gauge("finetune_trainer_total_steps", "total", registry=registry).set(100)
    server, _thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        sample = _read(server.server_port)
    finally:
        server.shutdown()
        server.server_close()
    assert sample is not None and (sample.step, sample.total_steps) == (42, 100)


def test_reads_every_field_the_fake_trainer_serves():
    fake = FakeTrainer("127.0.0.1", 0)
    try:
        fake.advance(7, 2.5)
        sample = _read(fake.port)
    finally:
        fake.server.shutdown()
        fake.server.server_close()
    assert sample is not None and sample.step == 7 and sample.loss == 2.5
    assert sample.tokens_per_second == 1234.5 and sample.heartbeat_time is not None


def test_error_answer_and_closed_port_are_unknown():
    class Broken(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b"finetune_trainer_step 5\n")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert _read(server.server_address[1]) is None
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert _read(closed) is None


def test_silent_trainer_is_read_on_its_first_ticks_then_every_few():
    assert all(scrape_due(n, 0) for n in range(UNANSWERED_TRIES))
    due = [scrape_due(UNANSWERED_TRIES, skipped) for skipped in range(UNANSWERED_EVERY)]
    assert due == [False] * (UNANSWERED_EVERY - 1) + [True]
