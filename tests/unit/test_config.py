"""Operator flags: defaults, environment fallbacks, and a clear refusal of nonsense."""
from __future__ import annotations

import pytest

from finetune_operator.config import OperatorConfig, parse_args


def test_api_connections_default_flag_and_environment(monkeypatch):
    assert parse_args([]).api_connections == OperatorConfig().api_connections == 48
    assert parse_args(["--api-connections", "8"]).api_connections == 8
    monkeypatch.setenv("FINETUNE_API_CONNECTIONS", "24")
    assert parse_args([]).api_connections == 24


def test_api_connections_below_one_is_refused_with_the_flag_named(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--api-connections", "0"])
    assert exc.value.code == 2
    assert "--api-connections must be at least 1, got 0" in capsys.readouterr().err
