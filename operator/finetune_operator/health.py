"""HTTP endpoints on the operator's loop: /healthz (answers while the event loop runs; the
process exits when kopf or the Lease renewal stops), /readyz (the API server answered
recently), /metrics (Prometheus)."""
from __future__ import annotations

import asyncio
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .metrics import REGISTRY


async def keep_checking_api(client, interval: float = 2.0) -> None:
    """Readiness must not depend on there being work: when the operator made no API call
    for `interval` seconds (kopf's watches do not go through our client), ask the API
    server for /version, so an outage shows within seconds."""
    while True:
        await asyncio.sleep(interval)
        if time.time() - client.state.last_success < interval and client.state.ready:
            continue
        try:
            await client.get("/version")
        except Exception:  # the client recorded the failure in its state
            pass


class HealthServer:
    def __init__(self, api_state, *, ready_window: float = 60.0):
        self._api = api_state
        self._ready_window = ready_window
        self._runners: list[web.AppRunner] = []

    def ready(self) -> tuple[bool, str]:
        if not self._api.ready:
            return False, f"API server unreachable: {self._api.last_error or 'no call yet'}"
        age = time.time() - self._api.last_success
        if age > self._ready_window:
            return False, f"no successful API call for {age:.0f}s"
        return True, "ok"

    @staticmethod
    def _closing(resp: web.Response) -> web.Response:
        # No keep-alive: an idle kept-alive connection (Prometheus keeps its scrape
        # connections open) is a task kopf waits 5 s for on shutdown, delaying the Lease
        # release on SIGTERM. One connection per probe or scrape costs nothing here.
        resp.force_close()
        return resp

    async def _healthz(self, _req):
        return self._closing(web.Response(text="ok"))

    async def _readyz(self, _req):
        ok, why = self.ready()
        return self._closing(web.Response(status=200 if ok else 503, text=why))

    async def _metrics(self, _req):
        return self._closing(web.Response(body=generate_latest(REGISTRY),
                                          headers={"Content-Type": CONTENT_TYPE_LATEST}))

    async def start(self, host: str, health_port: int, metrics_port: int) -> None:
        apps: dict[int, list[web.RouteDef]] = {}
        for port, routes in ((health_port, [web.get("/healthz", self._healthz),
                                            web.get("/readyz", self._readyz)]),
                             (metrics_port, [web.get("/metrics", self._metrics)])):
            apps.setdefault(port, []).extend(routes)
        for port, routes in apps.items():
            if port < 0:
                continue
            app = web.Application()
            app.add_routes(routes)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, host, port).start()
            self._runners.append(runner)

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
