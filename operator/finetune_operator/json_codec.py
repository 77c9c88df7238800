"""JSON for the API traffic: orjson, with the standard library as the fallback.

Decoding watch events and responses was 28 % of the operator's CPU while 1,000 jobs started
(py-spy; bench/README.md "Burst profile"): kopf's watch stream alone 18 %, since every pod
event carries the whole pod. orjson decodes those bodies 1.7x and encodes 14x faster than
`json`. Numbers: orjson reads integers up to 64 bits exactly and larger ones as floats, which
is what the API server stores for them anyway (it decodes a JSON integer as int64, as float64
on overflow: sigs.k8s.io/json; docs/ARCHITECTURE.md "JSON"). Text orjson refuses (NaN, which
the API server never sends) is handed to `json`; what neither decodes raises ValueError.
Encoding falls back to `json` for what orjson cannot encode (a key that is not a string)."""
from __future__ import annotations

import json
import types
from typing import Any

import orjson

from . import kopf_pin


def loads(data: bytes | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def dumps(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:  # e.g. a key that is not a string, an integer beyond 64 bits
        return json.dumps(obj).encode()


def install_in_kopf() -> None:
    """kopf's watch stream decodes each line with its module's `json.loads`: give that module
    this `loads`. Refuses (loudly) a kopf other than the one read."""
    kopf_pin.require("json_codec", "kopf/_cogs/clients/api.py (`stream`)")
    from kopf._cogs.clients import api
    setattr(api, "json", types.SimpleNamespace(loads=loads))  # noqa: B010 (a module, not a class)
