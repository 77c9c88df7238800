"""Fixtures for the trainer tests: a tiny random Llama + byte-level BPE tokenizer on disk
(loaded by the trainer through the real from_pretrained path), small JSONL datasets, and a
helper that runs ``python -m finetune_trainer`` as a subprocess."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainerkit import make_env

from finetune_testbed.trainer_fixtures import quiet_offline_env

# Before any test module imports transformers (docs/TRAINER.md pitfall 3); the imports above do not.
quiet_offline_env()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from transformers.utils import logging as hf_logging

    from finetune_testbed.trainer_fixtures import build_tiny_model

    hf_logging.disable_progress_bar()
    d = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(str(d))
    return d


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> Path:
    from finetune_testbed.trainer_fixtures import text_dataset

    return Path(text_dataset(str(tmp_path_factory.mktemp("data") / "train.jsonl"), n=400))


@pytest.fixture(scope="session")
def pc_data(tmp_path_factory) -> Path:
    from finetune_testbed.trainer_fixtures import prompt_completion_dataset

    return Path(prompt_completion_dataset(str(tmp_path_factory.mktemp("pcdata") / "pc.jsonl"), n=100))


@pytest.fixture
def trainer_env(tmp_path, tiny_model, text_data):
    def _make(**ft: object) -> dict[str, str]:
        return make_env(tmp_path, tiny_model, text_data, **ft)

    return _make
