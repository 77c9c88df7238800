"""The benchmark's own API client: plain JSON over `requests` with the cluster's admin
client certificate. Light on purpose (the watch client must not be the bottleneck it
measures), and it counts its own requests the way the API server labels them, so they
can be subtracted when API calls are attributed to a controller (see apimetrics.py)."""
from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import requests
from requests.adapters import HTTPAdapter

if TYPE_CHECKING:
    from finetune_testbed.cluster import LocalCluster

MERGE = "application/merge-patch+json"


class ApiError(Exception):
    def __init__(self, status: int, text: str, method: str, path: str):
        super().__init__(f"{method} {path}: HTTP {status}: {text[:300]}")
        self.status = status


def resource_key(method: str, path: str, watch: bool = False) -> tuple[str, str, str]:
    """(resource, subresource, VERB) as the API server's apiserver_request_total labels it."""
    parts = [p for p in path.split("?")[0].split("/") if p]
    rest = parts[2:] if parts[0] == "api" else parts[3:]
    named = False
    if len(rest) >= 2 and rest[0] == "namespaces" and len(rest) > 2:
        rest = rest[2:]
    if not rest:
        return "unknown", "", method
    resource = rest[0]
    subresource = rest[2] if len(rest) > 2 else ""
    named = len(rest) > 1
    verb = method
    if method == "GET":
        verb = "WATCH" if watch else ("GET" if named else "LIST")
    return resource, subresource, verb


class Api:
    def __init__(self, server: str, ca: str, cert: str, key: str, pool: int = 16):
        self.server = server.rstrip("/")
        self._verify = ca
        self._cert = (cert, key)
        self.session = self._new_session(pool)
        self.counts: Counter[tuple[str, str, str]] = Counter()
        self._lock = threading.Lock()

    @classmethod
    def for_cluster(cls, cluster: LocalCluster) -> Api:
        p = cluster.pki
        return cls(cluster.server, str(p.ca_cert), str(p.admin_cert), str(p.admin_key))

    def _new_session(self, pool: int) -> requests.Session:
        s = requests.Session()
        # REQUESTS_CA_BUNDLE in the environment would beat session.verify: do not read it.
        s.trust_env = False
        s.verify, s.cert = self._verify, self._cert
        adapter = HTTPAdapter(pool_connections=pool, pool_maxsize=pool)
        s.mount("https://", adapter)
        return s

    def _count(self, method: str, path: str, watch: bool = False) -> None:
        with self._lock:
            self.counts[resource_key(method, path, watch)] += 1

    def request(self, method: str, path: str, *, body: object = None, params: dict[str, str] | None = None,
                content_type: str = "application/json", timeout: float = 30) -> Any:
        """The decoded JSON response (None when empty); ApiError for HTTP >= 400."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        self._count(method, path)
        resp = self.session.request(method, self.server + path, data=data, params=params,
                                    headers=headers, timeout=timeout)
        if resp.status_code >= 400:
            raise ApiError(resp.status_code, resp.text, method, path)
        return resp.json() if resp.content else None

    def get(self, path: str, **params: str) -> Any:
        return self.request("GET", path, params=params or None)

    def create(self, path: str, body: dict) -> Any:
        return self.request("POST", path, body=body)

    def merge_patch(self, path: str, body: dict) -> Any:
        return self.request("PATCH", path, body=body, content_type=MERGE)

    def raw_text(self, path: str, timeout: float = 60) -> str:
        resp = self.session.get(self.server + path, timeout=timeout)
        resp.raise_for_status()
        return resp.text

    def watch(self, path: str, resource_version: str, timeout_seconds: int = 300,
              session: requests.Session | None = None) -> Iterator[dict]:
        """Watch events as dicts until the server ends the stream. One HTTP chunk per event,
        so each event is handed over as soon as it arrives."""
        self._count("GET", path, watch=True)
        params = {"watch": "1", "resourceVersion": resource_version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout_seconds)}
        s = session or self._new_session(1)
        with s.get(self.server + path, params=params, stream=True,
                   timeout=(10, timeout_seconds + 30)) as resp:
            if resp.status_code >= 400:
                raise ApiError(resp.status_code, resp.text, "WATCH", path)
            # chunk_size=None (read as data arrives) is valid: iter_lines hands it to iter_content,
            # which accepts None, but requests annotates iter_lines' chunk_size as int only.
            for line in resp.iter_lines(chunk_size=None):  # type: ignore[call-overload]
                if line:
                    yield json.loads(line)
