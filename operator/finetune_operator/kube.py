"""The operator's one shared async Kubernetes API client: plain JSON over aiohttp.

Deliberately tiny (no generated models: they cost memory and import time). It
counts every request by verb, resource and status code, and remembers whether the
last call reached the API server (the readiness probe reads that). An error answer raises
the ApiError subclass of its status (NotFound, Conflict, Forbidden, ...), so callers catch
what they handle instead of comparing codes."""
from __future__ import annotations

import json
import os
import signal
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf

from . import json_codec, metrics
from .api import GROUP, PLURAL, VERSION
from .config import OperatorConfig

JOBS_PATH = f"/apis/{GROUP}/{VERSION}"


MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class FaultInjection:
    """Test-only hooks, off unless the environment asks for them:
    FINETUNE_WRITE_LOG=<file> appends one JSON line per mutating API call;
    FINETUNE_CRASH_AFTER_WRITES=<n> SIGKILLs this process right after its n-th one
    (the crash-at-every-write reliability test)."""

    def __init__(self, env=os.environ):
        self.log_path = env.get("FINETUNE_WRITE_LOG")
        crash = env.get("FINETUNE_CRASH_AFTER_WRITES")
        self.crash_after = int(crash) if crash else None
        self.writes = 0

    def after_write(self, method: str, path: str, status: int) -> None:
        if self.log_path is None and self.crash_after is None:
            return
        if "selfsubjectaccessreviews" in path or "/leases" in path:
            return  # start-up checks and leader election: not the reconcile's writes
        self.writes += 1
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"n": self.writes, "method": method, "path": path,
                                    "status": status}) + "\n")
        if self.crash_after is not None and self.writes >= self.crash_after:
            os.kill(os.getpid(), signal.SIGKILL)


# The API server unreachable, restarting or dropping a connection: expected, retried, and
# logged in one line (a traceback would say "bug").
TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, OSError)


def resource_version(obj: Mapping | None) -> int:
    """An object's or list's resourceVersion as a number (0 when absent or odd)."""
    try:
        return int((obj or {}).get("metadata", {}).get("resourceVersion", 0))
    except (TypeError, ValueError):
        return 0


@dataclass(frozen=True)
class Cause:
    """One entry of a Status object's details.causes: the structured "why" of a refusal."""
    reason: str
    field: str
    message: str


class ApiError(Exception):
    """An HTTP error answer of the API server. Callers catch the subclass for the code they
    handle (api_error picks it from the status); anything else stays a plain ApiError."""

    def __init__(self, status: int, body: Any, method: str, path: str):
        self.status, self.body = status, body
        message = body.get("message") if isinstance(body, dict) else str(body)[:300]
        super().__init__(f"{method} {path}: HTTP {status}: {message}")

    @property
    def reason(self) -> str:
        return self.body.get("reason", "") if isinstance(self.body, dict) else ""

    @property
    def message(self) -> str:
        """The Status message (for people), or this error's own text when the body has none."""
        message = self.body.get("message") if isinstance(self.body, dict) else None
        return message if isinstance(message, str) else str(self)

    @property
    def causes(self) -> list[Cause]:
        details = self.body.get("details") if isinstance(self.body, dict) else None
        raw = (details.get("causes") if isinstance(details, dict) else None) or []
        return [Cause(str(c.get("reason") or ""), str(c.get("field") or ""), str(c.get("message") or ""))
                for c in raw if isinstance(c, dict)]

    def has_cause(self, reason: str) -> bool:
        return any(c.reason == reason for c in self.causes)


class BadRequest(ApiError):
    """400: a malformed request (a patch or body the server cannot decode)."""


class Forbidden(ApiError):
    """403: RBAC or admission (quota, Pod Security, a terminating namespace)."""

    @property
    def namespace_terminating(self) -> bool:
        # The NamespaceLifecycle admission plugin names this cause; the message is for people.
        return self.has_cause("NamespaceTerminating")


class NotFound(ApiError):
    """404."""


class Conflict(ApiError):
    """409: a resourceVersion or uid precondition failed (or, as AlreadyExists, the name is taken)."""


class AlreadyExists(Conflict):
    """409 with reason AlreadyExists: a create found the name taken."""


class Gone(ApiError):
    """410: a list continue token or resourceVersion older than etcd's compaction."""


class Invalid(ApiError):
    """422: validation refused the object; causes name the fields."""


_BY_STATUS: dict[int, type[ApiError]] = {400: BadRequest, 403: Forbidden, 404: NotFound, 409: Conflict,
                                         410: Gone, 422: Invalid}


def api_error(status: int, body: Any, method: str, path: str) -> ApiError:
    """The ApiError subclass for an error answer, chosen by HTTP status (and Status reason)."""
    cls = _BY_STATUS.get(status, ApiError)
    if cls is Conflict and isinstance(body, dict) and body.get("reason") == "AlreadyExists":
        cls = AlreadyExists
    return cls(status, body, method, path)


def _write_private(path: str, data: str | bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    cadata = info.ca_data.decode() if isinstance(info.ca_data, bytes) else info.ca_data
    # Only the cluster's CA when it names one, as kubectl: the system store would add ~150 public
    # CAs to what may vouch for the API server (and ~30 ms to every login).
    ctx = ssl.create_default_context(cafile=info.ca_path, cadata=None if info.ca_path else cadata)
    if info.certificate_data or info.private_key_data:
        _load_inline_cert_chain(ctx, info)
    elif info.certificate_path:
        ctx.load_cert_chain(info.certificate_path, info.private_key_path)
    return ctx


def _load_inline_cert_chain(ctx: ssl.SSLContext, info: kopf.ConnectionInfo) -> None:
    # ssl loads client certs only from files, but keeps them in memory once loaded: inline data
    # goes through a private (0700) directory removed before this returns, so no copy of the
    # key outlives the login, however often the client logs in again.
    cert, key = info.certificate_path, info.private_key_path
    with tempfile.TemporaryDirectory(prefix="finetune-client-") as tmp:
        if info.certificate_data:
            cert = os.path.join(tmp, "client.crt")
            _write_private(cert, info.certificate_data)
        if info.private_key_data:
            key = os.path.join(tmp, "client.key")
            _write_private(key, info.private_key_data)
        if cert:
            ctx.load_cert_chain(cert, key)


def _resource_of(path: str) -> str:
    parts = [p for p in path.split("?")[0].split("/") if p]
    # /api/v1/namespaces/ns/pods/name/status -> pods/status ; /apis/g/v/namespaces/ns/trainingjobs
    if "namespaces" in parts and len(parts) > parts.index("namespaces") + 2:
        rest = parts[parts.index("namespaces") + 2:]
    else:
        rest = parts[2:] if parts[0] == "api" else parts[3:]
    if not rest:
        return "unknown"
    return rest[0] + ("/" + rest[2] if len(rest) > 2 else "")


@dataclass
class ApiState:
    ready: bool = False
    last_success: float = 0.0
    last_error: str = ""


class KubeClient:
    def __init__(self, login: Callable[[], Awaitable[kopf.ConnectionInfo]] | kopf.ConnectionInfo,
                 timeout: float = 30.0, connections: int = OperatorConfig.api_connections):
        self._login = login
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None
        self._info: kopf.ConnectionInfo | None = None
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=5)
        self.state = ApiState()
        self.faults = FaultInjection()

    async def _ensure(self) -> None:
        if self._session is not None:
            return
        info = self._login if isinstance(self._login, kopf.ConnectionInfo) else await self._login()
        self._info = info
        self._session = aiohttp.ClientSession(
            base_url=info.server.rstrip("/") + "/",
            headers=info.as_http_headers(),
            connector=aiohttp.TCPConnector(ssl=_ssl_context(info), limit=self._connections),
            timeout=self._timeout,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, *, body: Any = None,
                      content_type: str = "application/json", params: dict | None = None,
                      accept: str | None = None) -> Any:
        await self._ensure()
        resource = _resource_of(path)
        data = None if body is None else json_codec.dumps(body)
        headers = {"Content-Type": content_type} if body is not None else {}
        if accept:
            headers["Accept"] = accept
        session = self._session
        assert session is not None  # _ensure made it
        try:
            async with session.request(method, path.lstrip("/"), data=data,
                                             headers=headers, params=params) as resp:
                raw = await resp.read()
                status = resp.status
        except TRANSPORT_ERRORS as exc:
            metrics.API_REQUESTS.labels(method.lower(), resource, "error").inc()
            self.state.ready, self.state.last_error = False, f"{type(exc).__name__}: {exc}"
            metrics.API_READY.set(0)
            raise
        metrics.API_REQUESTS.labels(method.lower(), resource, str(status)).inc()
        if method in MUTATING and status < 500:
            self.faults.after_write(method, path, status)
        self.state.ready, self.state.last_success = True, time.time()
        metrics.API_READY.set(1)
        try:
            payload = json_codec.loads(raw) if raw else None
        except ValueError:
            payload = raw.decode(errors="replace")
        if status == 401 and not isinstance(self._login, kopf.ConnectionInfo):
            await self.close()  # credentials rotated (projected SA token): log in again next time
        if status >= 400:
            raise api_error(status, payload, method, path)
        return payload

    # ---- typed helpers -------------------------------------------------------------
    async def get(self, path: str, *, accept: str | None = None, **params) -> Any:
        return await self.request("GET", path, params=params or None, accept=accept)

    async def create(self, path: str, body: dict) -> dict:
        return await self.request("POST", path, body=body)

    async def delete(self, path: str, body: dict | None = None) -> Any:
        return await self.request("DELETE", path, body=body)

    # ---- paths ---------------------------------------------------------------------
    @staticmethod
    def job_path(namespace: str, name: str = "") -> str:
        base = f"{JOBS_PATH}/namespaces/{namespace}/{PLURAL}"
        return f"{base}/{name}" if name else base

    @staticmethod
    def pod_path(namespace: str, name: str = "") -> str:
        base = f"/api/v1/namespaces/{namespace}/pods"
        return f"{base}/{name}" if name else base

