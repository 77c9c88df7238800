"""Packing (docs/TRAINER.md "Packing"): the pure packer's properties, attention isolation inside a
packed row on the tiny model, the cache key, and packed runs taking fewer steps with the masks kept."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import finetune_contract as c
from finetune_trainer import packing
from finetune_trainer.data import IGNORE_INDEX

pytestmark = pytest.mark.trainer


def _examples(draw_lengths: list[int], label_bits: list[bool]) -> list[tuple[list[int], list[int]]]:
    """Examples with distinct token ids (so each token can be traced) and mixed masks."""
    out, next_id, bit = [], 0, 0
    for n in draw_lengths:
        ids = list(range(next_id, next_id + n))
        next_id += n
        labels = []
        for tok in ids:
            labels.append(tok if label_bits[bit % len(label_bits)] else IGNORE_INDEX)
            bit += 1
        out.append((ids, labels))
    return out


@settings(max_examples=300, deadline=None)
@given(
    seq_len=st.integers(1, 64),
    lengths=st.lists(st.integers(1, 64), max_size=60),
    label_bits=st.lists(st.booleans(), min_size=1, max_size=7),
)
def test_packing_loses_no_token_and_keeps_masks_aligned(seq_len, lengths, label_bits):
    lengths = [min(n, seq_len) for n in lengths]
    examples = _examples(lengths, label_bits)
    rows = packing.pack(examples, seq_len)

    all_ids = [t for ids, _, _ in rows for t in ids]
    assert sorted(all_ids) == sorted(t for ids, _ in examples for t in ids)  # none lost, none duplicated
    by_first = {ids[0]: (ids, labels) for ids, labels in examples}
    for ids, labels, positions in rows:
        assert 1 <= len(ids) <= seq_len and len(labels) == len(ids) == len(positions)
        starts = [k for k, p in enumerate(positions) if p == 0]
        assert starts and starts[0] == 0
        for start, end in zip(starts, [*starts[1:], len(ids)], strict=True):
            ex_ids, ex_labels = by_first[ids[start]]  # a segment is one whole example
            assert ids[start:end] == ex_ids and positions[start:end] == list(range(len(ex_ids)))
            # its mask, except the first label (never a target unpacked either)
            assert labels[start:end] == [IGNORE_INDEX, *ex_labels[1:]]
    # best-fit decreasing packs within twice the optimum (every two rows hold > seq_len tokens)
    if rows:
        assert len(rows) <= max(1, math.ceil(2 * sum(lengths) / seq_len))


@given(seq_len=st.integers(1, 16), n=st.integers(17, 40))
def test_an_example_longer_than_the_row_is_refused(seq_len, n):
    with pytest.raises(ValueError, match=f"packing needs 1..{seq_len}"):
        packing.plan_packs([1, n], seq_len)


def test_the_plan_is_deterministic_and_fills_rows():
    lengths = [5, 3, 8, 2, 6, 4, 7, 1]
    assert packing.plan_packs(lengths, 10) == packing.plan_packs(list(lengths), 10)
    assert sorted(sum(lengths[i] for i in row) for row in packing.plan_packs(lengths, 10)) == [6, 10, 10, 10]


def test_a_packed_row_attends_within_each_example(tiny_model):
    """Logits of a packed row (position ids, no attention mask) equal each example's logits on its own.
    Without a KV cache, as in training (apply_lora turns use_cache off): transformers looks for packed
    position ids only then."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune_trainer.data import PadCollator

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    examples = [([5, 17, 23, 9, 41], [5, 17, 23, 9, 41]), ([7, 8, 9], [IGNORE_INDEX, IGNORE_INDEX, 9]),
                ([3, 4], [3, 4])]  # fmt: skip
    (row,) = packing.pack(examples, 16)
    batch = PadCollator(pad_token_id=0)(
        [{"input_ids": row[0], "labels": row[1], "position_ids": row[2]}, {"input_ids": [1, 2], "labels": [1, 2],
                                                                            "position_ids": [0, 1]}]
    )
    assert "attention_mask" not in batch and batch["position_ids"][1].tolist()[2:] == list(range(8))
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        offset = 0
        for ids, _ in sorted(examples, key=lambda e: row[0].index(e[0][0])):
            alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            assert torch.allclose(packed[offset : offset + len(ids)], alone, atol=1e-5)
            offset += len(ids)


def test_the_cache_key_covers_packing(tmp_path, tiny_model, text_data):
    from transformers import AutoTokenizer

    from finetune_trainer import features

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    cfg = c.TrainerConfig(model=str(tiny_model), dataset=str(text_data), output_dir=str(tmp_path))
    assert features.cache_key(cfg, tok) != features.cache_key(cfg.replace(packing=True), tok)
    assert features.cache_key(cfg, tok) == features.cache_key(cfg.replace(packing=False), tok)


def _run(cfg: c.TrainerConfig):
    from finetune_trainer import data, training
    from finetune_trainer.stop import StopSignal
    from finetune_trainer.worker import Report

    report = Report(cfg, enabled=False)
    outcome, message = training.train(cfg, cfg.model, data.prepare(cfg), StopSignal(), report, None)
    assert outcome == c.OUTCOME_COMPLETED, message
    return report


def test_a_packed_run_takes_fewer_steps_and_trains_the_same_targets(tmp_path, tiny_model, pc_data):
    """One epoch of prompt-completion data (loss on completions only), unpacked then packed."""
    import datasets

    base = c.TrainerConfig(
        model=str(tiny_model), dataset=str(pc_data), epochs=1, batch_size=4, seq_len=64, save_steps=1000, seed=7,
        termination_log="",
    )  # fmt: skip
    plain = base.replace(output_dir=str(tmp_path / "plain"))
    packed = base.replace(output_dir=str(tmp_path / "packed"), packing=True)
    plain_report, packed_report = _run(plain), _run(packed)

    def cached(cfg):
        (arrow,) = (tmp_path / cfg.output_dir).glob("checkpoints/trainer/datasets/tokenized-*.arrow")
        return datasets.Dataset.from_file(str(arrow))

    unpacked_rows, packed_rows = cached(plain), cached(packed)
    lengths = [len(ids) for ids in unpacked_rows["input_ids"]]
    assert packed_rows.num_rows == len(packing.plan_packs(lengths, 64)) < unpacked_rows.num_rows
    assert plain_report.max_steps == math.ceil(unpacked_rows.num_rows / 4)
    assert packed_report.max_steps == math.ceil(packed_rows.num_rows / 4) < plain_report.max_steps
    assert packed_report.loss is not None and math.isfinite(packed_report.loss)
    # every token kept; the trained targets are the completions', as unpacked
    assert sum(len(r) for r in packed_rows["input_ids"]) == sum(lengths)

    def targets(rows, skip_first):
        return sorted(t for labels in rows["labels"] for t in labels[1 if skip_first else 0 :] if t != IGNORE_INDEX)

    assert targets(packed_rows, False) == targets(unpacked_rows, True)
    assert targets(unpacked_rows, True)  # completion tokens exist (prompts are -100)
    assert len(targets(unpacked_rows, True)) < sum(lengths)


def test_packing_messages_keeps_assistant_only_labels(tmp_path, tiny_model):
    """A messages dataset packs too: the packed labels are the assistant tokens of the unpacked rows."""
    import datasets

    from finetune_testbed.trainer_fixtures import messages_records, write_jsonl

    data_path = write_jsonl(str(tmp_path / "chat.jsonl"), messages_records(n=40))
    base = c.TrainerConfig(
        model=str(tiny_model), dataset=data_path, max_steps=1, batch_size=4, seq_len=256, save_steps=1000, seed=7,
        termination_log="",
    )  # fmt: skip
    rows = {}
    for name, pack in (("plain", False), ("packed", True)):
        assert _run(base.replace(output_dir=str(tmp_path / name), packing=pack)).step == 1
        (arrow,) = (tmp_path / name).glob("checkpoints/trainer/datasets/tokenized-*.arrow")
        rows[name] = datasets.Dataset.from_file(str(arrow))
        assert not list((tmp_path / name).glob("checkpoints/trainer/datasets/*.unpacked"))  # the packer's input
    plain, packed = rows["plain"], rows["packed"]
    assert packed.column_names == ["input_ids", "labels", "position_ids"]
    assert all(len(ids) <= 256 for ids in packed["input_ids"]) and packed.num_rows < plain.num_rows
    assert sorted(t for labels in packed["labels"] for t in labels if t != IGNORE_INDEX) == sorted(
        t for labels in plain["labels"] for t in labels[1:] if t != IGNORE_INDEX
    )
    assert sum(t != IGNORE_INDEX for labels in plain["labels"] for t in labels) < sum(map(len, plain["labels"]))
