"""Every TrainingJob shipped in examples/ is valid for the operator's own models."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune_operator.api import parse_spec

EXAMPLES = sorted(Path(__file__).resolve().parents[2].joinpath("examples").rglob("*.yaml"))


def training_jobs():
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "TrainingJob":
                yield pytest.param(doc, id=f"{path.name}:{doc['metadata']['name']}")


@pytest.mark.parametrize("doc", list(training_jobs()))
def test_example_is_a_valid_spec(doc):
    spec = parse_spec(doc["spec"])
    assert spec.image and spec.model


def test_there_are_examples():
    assert list(training_jobs())
