"""The operator's API client: error answers become typed errors (by status, Status reason and
details.causes), the callers branch on those types, and inline client keys leave no files."""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import ssl
import stat
import tempfile
from collections.abc import Callable
from typing import Any

import kopf
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from finetune_operator import actions, kube
from finetune_operator.config import OperatorConfig
from finetune_operator.kube import (
    AlreadyExists,
    ApiError,
    BadRequest,
    Cause,
    Conflict,
    Forbidden,
    Gone,
    Invalid,
    KubeClient,
    NotFound,
    api_error,
)
from finetune_operator.leader import LeaderElector
from finetune_operator.preflight import PreflightError, preflight


def status(code: int, reason: str, message: str, causes: list[dict] | None = None, **details: Any) -> dict:
    body: dict = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                  "message": message, "reason": reason, "code": code, "details": dict(details)}
    if causes is not None:
        body["details"]["causes"] = causes
    return body


# Bodies as kube-apiserver v1.37 answers them (recorded against the test bed's control plane).
TERMINATING = status(403, "Forbidden", 'pods "p1" is forbidden: unable to create new content in namespace probe '
                     "because it is being terminated",
                     [{"reason": "NamespaceTerminating", "message": "namespace probe is being terminated",
                       "field": "metadata.namespace"}], name="p1", kind="pods")
RBAC = status(403, "Forbidden", 'pods is forbidden: User "system:serviceaccount:x:y" cannot create resource "pods" '
              'in API group "" in the namespace "ns"', kind="pods")
NOT_FOUND = status(404, "NotFound", 'pods "nope" not found', name="nope", kind="pods")
ALREADY_EXISTS = status(409, "AlreadyExists", 'pods "j-1" already exists', name="j-1", kind="pods")
CONFLICT = status(409, "Conflict", 'Operation cannot be fulfilled on namespaces "default": the object has been '
                  "modified; please apply your changes to the latest version and try again",
                  name="default", kind="namespaces")
INVALID = status(422, "Invalid", 'Pod "Bad_Name" is invalid: [metadata.name: Invalid value: "Bad_Name", '
                 "spec.containers: Required value]",
                 [{"reason": "FieldValueInvalid", "message": 'Invalid value: "Bad_Name"', "field": "metadata.name"},
                  {"reason": "FieldValueRequired", "message": "Required value", "field": "spec.containers"}],
                 name="Bad_Name", kind="Pod")
BAD_REQUEST = status(400, "BadRequest", "error decoding patch: invalid character 'x'")
GONE = status(410, "Expired", "The provided continue parameter is too old")


@pytest.mark.parametrize("code, body, cls", [
    (400, BAD_REQUEST, BadRequest), (403, RBAC, Forbidden), (403, TERMINATING, Forbidden),
    (404, NOT_FOUND, NotFound), (409, CONFLICT, Conflict), (409, ALREADY_EXISTS, AlreadyExists),
    (410, GONE, Gone), (422, INVALID, Invalid),
    (401, status(401, "Unauthorized", "Unauthorized"), ApiError), (500, "etcd timeout", ApiError),
    (429, status(429, "TooManyRequests", "slow down"), ApiError),
])
def test_the_status_picks_the_class(code, body, cls):
    exc = api_error(code, body, "GET", "/x")
    assert type(exc) is cls
    assert isinstance(exc, ApiError) and exc.status == code and exc.body is body


def test_already_exists_is_a_conflict_told_apart_by_its_reason():
    taken, stale = api_error(409, ALREADY_EXISTS, "POST", "/p"), api_error(409, CONFLICT, "PUT", "/p")
    assert isinstance(taken, Conflict) and isinstance(stale, Conflict)
    assert not isinstance(stale, AlreadyExists)
    assert (taken.reason, stale.reason) == ("AlreadyExists", "Conflict")


def test_causes_come_from_the_status_details():
    exc = api_error(422, INVALID, "POST", "/api/v1/namespaces/ns/pods")
    assert exc.causes == [Cause("FieldValueInvalid", "metadata.name", 'Invalid value: "Bad_Name"'),
                          Cause("FieldValueRequired", "spec.containers", "Required value")]
    assert exc.has_cause("FieldValueRequired") and not exc.has_cause("NamespaceTerminating")


@pytest.mark.parametrize("body", ["<html>bad gateway</html>", None, {"message": "no details"},
                                  {"details": {"causes": "not a list of objects"}},
                                  {"details": {"causes": [None, "x", {"reason": None}]}}])
def test_odd_bodies_have_no_causes_and_still_a_message(body):
    exc = api_error(403, body, "GET", "/x")
    assert [c for c in exc.causes if c.reason] == []
    assert not exc.namespace_terminating
    assert exc.message and "HTTP 403" in str(exc)


def test_a_terminating_namespace_is_read_from_the_structured_cause_not_the_message():
    assert api_error(403, TERMINATING, "POST", "/p").namespace_terminating
    assert not api_error(403, RBAC, "POST", "/p").namespace_terminating
    # The words alone do not count: only the admission plugin's cause does.
    worded = status(403, "Forbidden", "pods is forbidden: ... because it is being terminated")
    assert not api_error(403, worded, "POST", "/p").namespace_terminating


def test_the_text_keeps_method_path_code_and_message():
    exc = api_error(404, NOT_FOUND, "GET", "/api/v1/namespaces/default/pods/nope")
    assert str(exc) == 'GET /api/v1/namespaces/default/pods/nope: HTTP 404: pods "nope" not found'
    assert exc.message == 'pods "nope" not found'


# ---- callers ----------------------------------------------------------------------------------
class FakeClient:
    """KubeClient's surface as the callers use it; each call answers from a script."""

    job_path, pod_path = staticmethod(KubeClient.job_path), staticmethod(KubeClient.pod_path)

    def __init__(self, **answers: Callable[[str, Any], Any]):
        self.answers = answers
        self.calls: list[tuple[str, str]] = []

    async def _call(self, verb: str, path: str, body: Any = None) -> Any:
        self.calls.append((verb, path))
        answer = self.answers.get(verb)
        if answer is None:
            raise AssertionError(f"unexpected {verb} {path}")
        result = answer(path, body)
        if isinstance(result, ApiError):
            raise result
        return result

    async def get(self, path: str, **params) -> Any:
        return await self._call("get", path)

    async def create(self, path: str, body: dict) -> Any:
        return await self._call("create", path, body)

    async def delete(self, path: str, body: dict | None = None) -> Any:
        return await self._call("delete", path, body)

    async def request(self, method: str, path: str, *, body: Any = None, **_) -> Any:
        return await self._call(method.lower(), path, body)


def fails(code: int, body: Any) -> Callable[[str, Any], ApiError]:
    return lambda path, _body: api_error(code, body, "X", path)


POD = {"metadata": {"name": "j-1", "ownerReferences": [{"uid": "job-uid", "controller": True}]}}


def create_pod(client: FakeClient) -> str:
    return asyncio.run(actions.create_pod(client, "ns", POD))  # type: ignore[arg-type]


def test_create_pod_in_a_terminating_namespace_is_no_error():
    assert create_pod(FakeClient(create=fails(403, TERMINATING))) == "namespace-terminating"


@pytest.mark.parametrize("code, body, kind", [(403, RBAC, "forbidden"), (422, INVALID, "rejected"),
                                              (400, BAD_REQUEST, "rejected")])
def test_create_pod_refusals_carry_the_status_message(code, body, kind):
    with pytest.raises(actions.PodRejected) as info:
        create_pod(FakeClient(create=fails(code, body)))
    assert (info.value.kind, info.value.detail) == (kind, body["message"])


@pytest.mark.parametrize("owner, outcome", [("job-uid", "adopted"), ("someone-else", "conflict")])
def test_create_pod_already_exists_adopts_only_our_pod(owner, outcome):
    existing = {"metadata": {"ownerReferences": [{"uid": owner, "controller": True}]}}
    client = FakeClient(create=fails(409, ALREADY_EXISTS), get=lambda path, _: existing)
    assert create_pod(client) == outcome
    assert client.calls[-1] == ("get", "/api/v1/namespaces/ns/pods/j-1")


@pytest.mark.parametrize("code, body", [(409, CONFLICT), (404, NOT_FOUND), (500, "boom")])
def test_create_pod_passes_on_what_it_does_not_handle(code, body):
    with pytest.raises(ApiError) as info:
        create_pod(FakeClient(create=fails(code, body)))
    assert info.value.status == code


@pytest.mark.parametrize("code, body", [(404, NOT_FOUND), (409, CONFLICT)])
def test_deletes_of_what_is_gone_or_replaced_are_quiet(code, body):
    client = FakeClient(delete=fails(code, body))
    assert asyncio.run(actions.delete_pod(client, "ns", "j-1", uid="u")) is False  # type: ignore[arg-type]
    assert asyncio.run(actions.delete_job(client, "ns", "j", "u")) is None  # type: ignore[arg-type]
    with pytest.raises(Forbidden):
        asyncio.run(actions.delete_pod(FakeClient(delete=fails(403, RBAC)), "ns", "j-1"))  # type: ignore[arg-type]


def test_replace_status_raises_conflict_on_a_409():
    job = {"metadata": {"name": "j", "namespace": "ns", "resourceVersion": "7"}, "spec": {}}
    with pytest.raises(kube.Conflict):
        asyncio.run(actions.replace_status(FakeClient(put=fails(409, CONFLICT)), job, {}))  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        asyncio.run(actions.replace_status(FakeClient(put=fails(404, NOT_FOUND)), job, {}))  # type: ignore[arg-type]


def elector(client: FakeClient) -> LeaderElector:
    return LeaderElector(client, "ns", "lease", "me")  # type: ignore[arg-type]


def test_leader_creates_a_missing_lease_and_loses_the_race_quietly():
    won = FakeClient(get=fails(404, NOT_FOUND), create=lambda path, body: body)
    assert asyncio.run(elector(won).try_acquire()) is True
    lost = FakeClient(get=fails(404, NOT_FOUND), create=fails(409, ALREADY_EXISTS))
    assert asyncio.run(elector(lost).try_acquire()) is False
    with pytest.raises(Forbidden):
        asyncio.run(elector(FakeClient(get=fails(403, RBAC))).try_acquire())


def test_leader_renewal_conflict_means_someone_else_was_first():
    lease = {"metadata": {"resourceVersion": "3"}, "spec": {"holderIdentity": "me"}}
    client = FakeClient(get=lambda path, _: lease, put=fails(409, CONFLICT))
    assert asyncio.run(elector(client).try_acquire()) is False


@pytest.mark.parametrize("code, body, expect", [(404, NOT_FOUND, "is not installed"),
                                                (500, "boom", "cannot read CRD")])
def test_preflight_names_a_missing_or_unreadable_crd(code, body, expect):
    with pytest.raises(PreflightError, match=expect):
        asyncio.run(preflight(FakeClient(get=fails(code, body)), OperatorConfig()))  # type: ignore[arg-type]


def test_preflight_goes_on_to_the_access_reviews_when_crds_are_unreadable():
    client = FakeClient(get=fails(403, RBAC), create=lambda path, body: {"status": {"allowed": True}})
    asyncio.run(preflight(client, OperatorConfig()))  # type: ignore[arg-type]
    assert any(verb == "create" and "selfsubjectaccessreviews" in path for verb, path in client.calls)


# ---- the real client over HTTP -----------------------------------------------------------------
async def serve(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def test_the_client_raises_the_typed_error_of_the_answer():
    async def main() -> list[ApiError]:
        answers = {"/gone": (404, NOT_FOUND), "/taken": (409, ALREADY_EXISTS), "/terminating": (403, TERMINATING),
                   "/text": (500, "etcd timeout")}

        async def handler(request: web.Request) -> web.Response:
            code, body = answers[request.path]
            if isinstance(body, str):
                return web.Response(status=code, text=body)
            return web.json_response(body, status=code)

        runner, url = await serve(handler)
        client = KubeClient(kopf.ConnectionInfo(server=url))
        errors = []
        try:
            for path in answers:
                try:
                    await client.get(path)
                except ApiError as exc:
                    errors.append(exc)
        finally:
            await client.close()
            await runner.cleanup()
        return errors

    gone, taken, terminating, text = asyncio.run(main())
    assert type(gone) is NotFound and type(taken) is AlreadyExists and type(text) is ApiError
    assert isinstance(terminating, Forbidden) and terminating.namespace_terminating
    assert text.body == "etcd timeout" and text.causes == []


# ---- inline client keys ---------------------------------------------------------------------------
def client_cert() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "finetune-operator")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(hours=1)).sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_relogin_with_inline_keys_leaves_no_files(tmp_path, monkeypatch):
    """Every 401 makes the client log in again (a rotated credential); each login loads the
    inline key through a private directory that is gone again before the login returns."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cert_pem, key_pem = client_cert()
    loaded: list[tuple[int, int, int]] = []

    class SpyContext(ssl.SSLContext):
        def load_cert_chain(self, certfile, keyfile=None, password=None):  # type: ignore[override]
            loaded.append((stat.S_IMODE(os.stat(os.path.dirname(certfile)).st_mode),
                           stat.S_IMODE(os.stat(certfile).st_mode), stat.S_IMODE(os.stat(keyfile).st_mode)))
            super().load_cert_chain(certfile, keyfile, password)

    monkeypatch.setattr(kube.ssl, "create_default_context", lambda **_: SpyContext(ssl.PROTOCOL_TLS_CLIENT))
    logins = 0

    async def main() -> None:
        nonlocal logins

        async def handler(request: web.Request) -> web.Response:
            return web.json_response(status(401, "Unauthorized", "Unauthorized"), status=401)

        runner, url = await serve(handler)

        async def login() -> kopf.ConnectionInfo:
            nonlocal logins
            logins += 1
            return kopf.ConnectionInfo(server=url, certificate_data=cert_pem, private_key_data=key_pem.decode())

        client = KubeClient(login)
        try:
            for _ in range(5):
                with pytest.raises(ApiError) as info:
                    await client.get("/api/v1/namespaces")
                assert info.value.status == 401
                assert os.listdir(tmp_path) == []
        finally:
            await client.close()
            await runner.cleanup()

    asyncio.run(main())
    assert logins == 5
    assert loaded == [(0o700, 0o600, 0o600)] * 5
    assert os.listdir(tmp_path) == []


def test_key_paths_are_used_in_place(tmp_path, monkeypatch):
    cert_pem, key_pem = client_cert()
    (tmp_path / "c.pem").write_bytes(cert_pem)
    (tmp_path / "k.pem").write_bytes(key_pem)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    info = kopf.ConnectionInfo(server="https://x", certificate_path=str(tmp_path / "c.pem"),
                               private_key_path=str(tmp_path / "k.pem"))
    assert isinstance(kube._ssl_context(info), ssl.SSLContext)
    assert os.listdir(scratch) == []


def test_a_bad_inline_key_fails_the_login_and_still_leaves_no_files(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cert_pem, _ = client_cert()
    info = kopf.ConnectionInfo(server="https://x", certificate_data=cert_pem, private_key_data=b"not a key")
    with pytest.raises(ssl.SSLError):
        kube._ssl_context(info)
    assert os.listdir(tmp_path) == []


def test_inline_keys_authenticate_over_tls_after_their_files_are_gone(tmp_path, monkeypatch):
    """A TLS server that requires a client certificate: the key loaded from the removed
    files still signs every handshake, on the first login and the next one."""
    from finetune_testbed import pki as pki_mod
    pki = pki_mod.generate(tmp_path / "pki")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    async def main() -> list[str]:
        async def handler(request: web.Request) -> web.Response:
            peer = request.transport.get_extra_info("peercert")  # type: ignore[union-attr]
            cn = dict(x[0] for x in peer["subject"])["commonName"]
            if request.path == "/rotate":
                return web.json_response(status(401, "Unauthorized", "Unauthorized"), status=401)
            return web.json_response({"cn": cn})

        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca_cert))
        server_ctx.load_cert_chain(str(pki.serving_cert), str(pki.serving_key))
        server_ctx.verify_mode = ssl.CERT_REQUIRED
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        async def login() -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=f"https://127.0.0.1:{port}", ca_data=pki.ca_cert.read_bytes(),
                                       certificate_data=pki.admin_cert.read_bytes(),
                                       private_key_data=pki.admin_key.read_text())

        client = KubeClient(login)
        seen = []
        try:
            seen.append((await client.get("/whoami"))["cn"])
            assert os.listdir(scratch) == []
            with pytest.raises(ApiError):
                await client.get("/rotate")  # 401: the next request logs in again
            seen.append((await client.get("/whoami"))["cn"])
        finally:
            await client.close()
            await runner.cleanup()
        return seen

    assert asyncio.run(main()) == ["admin", "admin"]
    assert os.listdir(scratch) == []


def test_a_named_cluster_ca_is_the_only_one_trusted():
    cert_pem, _ = client_cert()
    ctx = kube._ssl_context(kopf.ConnectionInfo(server="https://x", ca_data=cert_pem))
    assert isinstance(ctx, ssl.SSLContext) and ctx.cert_store_stats()["x509"] == 1
