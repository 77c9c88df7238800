"""finetune_operator.json_codec: decodes and encodes exactly as the standard library does for
every JSON value (orjson where it can, `json` where orjson refuses), and kopf's watch stream
decodes with it once installed."""
from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kopf._cogs.clients import api

from finetune_operator import json_codec, kopf_pin


def json_values(integers: st.SearchStrategy[int]) -> st.SearchStrategy:
    scalars = st.none() | st.booleans() | integers | st.floats(allow_nan=False, allow_infinity=False) | st.text()
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(), inner, max_size=4), max_leaves=20)


JSON = json_values(st.integers())
# What the API server sends: it decodes JSON integers as int64 (float64 beyond), and orjson
# reads integers beyond 64 bits as floats too (docs/ARCHITECTURE.md, "JSON").
API_JSON = json_values(st.integers(min_value=-(2**63), max_value=2**64 - 1))


@given(API_JSON)
def test_decodes_what_the_standard_library_decodes(value):
    text = json.dumps(value)
    assert json_codec.loads(text) == json.loads(text)
    assert json_codec.loads(text.encode()) == json.loads(text)


@given(JSON)
def test_encodes_what_decodes_back_to_the_value(value):
    assert json.loads(json_codec.dumps(value)) == value


def test_values_orjson_refuses_fall_back_to_the_standard_library():
    int64 = '{"spec": {"maxSteps": 9223372036854775807, "lr": NaN}}'  # NaN: orjson refuses it
    decoded = json_codec.loads(int64)
    assert decoded["spec"]["maxSteps"] == 9223372036854775807 and decoded["spec"]["lr"] != 0
    assert json.loads(json_codec.dumps({1: "a"})) == {"1": "a"}  # a key that is not a string
    with pytest.raises(ValueError):
        json_codec.loads(b"not json")


def test_kopf_watch_stream_decodes_with_it_once_installed(monkeypatch):
    monkeypatch.setattr(api, "json", api.json)  # restored after the test
    json_codec.install_in_kopf()
    assert api.json.loads is json_codec.loads
    line = b'{"type": "MODIFIED", "object": {"metadata": {"name": "a", "generation": 18446744073709551616}}}'
    assert api.json.loads(line.decode("utf-8")) == json.loads(line)


def test_refuses_another_kopf(monkeypatch):
    monkeypatch.setattr(kopf_pin.importlib.metadata, "version", lambda _: "1.46.0")
    with pytest.raises(RuntimeError, match="written for kopf 1.45.2, found 1.46.0"):
        json_codec.install_in_kopf()
