"""A thin dict-in, dict-out layer over the `kubernetes` client's transport.

The test bed (real node, chaos, reliability tests) speaks to the API server with plain
JSON: the typed models of the generated client are strict and slow to (de)serialise, and
fault injection needs exact control over patch content types, DeleteOptions and watches. Authentication, TLS and the
kubeconfig handling all come from `kubernetes.config` / `kubernetes.client.ApiClient`."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

STRATEGIC = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"


def _short(exc: BaseException) -> str:
    """One short line for a transport error (urllib3's are long and nested)."""
    inner = getattr(exc, "reason", None) or exc
    text = str(inner)
    m = re.search(r"\[Errno \d+\] [^'\")]+", text)
    return f"{type(inner).__name__}: {m.group(0) if m else text[:160]}"


class ApiError(Exception):
    """A failed request. `status` is the HTTP status, 0 when the server was not reached."""

    def __init__(self, status: int, message: str, body: dict | None = None):
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message
        self.body = body or {}

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409


class Kube:
    def __init__(self, kubeconfig: str | Path | None = None):
        from kubernetes import config
        if kubeconfig:
            self.api = config.new_client_from_config(config_file=str(kubeconfig))
        else:
            self.api = config.new_client_from_config()
        self.server = self.api.configuration.host

    def close(self) -> None:
        self.api.close()

    def _call(self, method: str, path: str, query: dict | None, body, content_type: str | None,
              timeout):
        from kubernetes.client.exceptions import ApiException
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        params = [(k, v) for k, v in (query or {}).items() if v is not None]
        try:
            m, url, hdrs, b, _ = self.api.param_serialize(
                method, path, query_params=params or None, header_params=headers, body=body,
                auth_settings=["BearerToken"])
            return self.api.call_api(m, url, hdrs, b, _request_timeout=timeout)
        except ApiException as exc:
            raise ApiError(exc.status or 0, str(exc.reason or exc)) from exc
        except Exception as exc:
            raise ApiError(0, _short(exc)) from exc

    def request(self, method: str, path: str, *, query: dict | None = None, body=None,
                content_type: str | None = None, timeout: float = 10.0) -> dict | None:
        resp = self._call(method, path, query, body, content_type, timeout)
        try:
            data = resp.read()
        except Exception as exc:
            raise ApiError(0, f"reading response: {exc}") from exc
        try:
            obj = json.loads(data) if data else None
        except ValueError:
            obj = None
        if not 200 <= resp.status <= 299:
            msg = (obj or {}).get("message") if isinstance(obj, dict) else None
            raise ApiError(resp.status, msg or (data[:200].decode(errors="replace") if data else ""),
                           obj if isinstance(obj, dict) else None)
        return obj

    def get(self, path: str, **kw) -> dict:
        obj = self.request("GET", path, **kw)
        if obj is None:  # a 2xx GET without a JSON object: no answer to hand back
            raise ApiError(0, f"GET {path}: the response holds no JSON object")
        return obj

    def get_or_none(self, path: str, **kw) -> dict | None:
        """The object, or None when it does not exist (404)."""
        try:
            return self.get(path, **kw)
        except ApiError as exc:
            if exc.not_found:
                return None
            raise

    def watch(self, path: str, query: dict, timeout: float) -> Iterator[dict]:
        """Yields watch events ({type, object}) until the server ends the stream."""
        from kubernetes.watch.watch import iter_resp_lines
        resp = self._call("GET", path, {**query, "watch": "true"}, None, None,
                          (10, timeout))
        raw = resp.response
        try:
            if not 200 <= resp.status <= 299:
                data = raw.read()
                raise ApiError(resp.status, data[:300].decode(errors="replace"))
            for line in iter_resp_lines(raw):
                try:
                    yield json.loads(line)
                except ValueError:
                    continue
        except ApiError:
            raise
        except Exception as exc:
            raise ApiError(0, f"watch stream: {_short(exc)}") from exc
        finally:
            try:
                raw.release_conn()
                raw.close()
            except Exception:
                pass
