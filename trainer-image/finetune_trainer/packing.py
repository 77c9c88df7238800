"""Packing: tokenized examples concatenated into rows of at most ``seq_len`` tokens (torch-free).

Pure functions (``plan_packs``, ``pack_row``, ``pack``) plus ``pack_features``, which rewrites a
tokenized Arrow dataset packed (docs/TRAINER.md "Packing"). Examples are never split: they are
already truncated to ``seq_len``, so every token of every example lands in exactly one row.

No cross-contamination between the examples of a row:
- attention: each row carries ``position_ids`` restarting at 0 at every example, and the collator
  then sends no ``attention_mask``; transformers builds a block-diagonal causal mask from such
  position ids (``masking_utils.find_packed_sequence_indices``, docs/TRAINER.md "Packing");
- loss: an example's labels are kept as they are (prompt / non-assistant tokens stay -100), except
  its first label, which becomes -100: the model's shifted loss would otherwise train the previous
  example's last token to predict it. Unpacked, the first label is never a target either, so a
  packed row trains exactly the (context, target) pairs its examples train on their own.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from typing import Any

IGNORE_INDEX = -100
PACK_CHUNK_ROWS = 1024  # packed rows written per Arrow batch (bounded memory for large datasets)


def plan_packs(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Groups of example indices whose lengths add up to at most ``seq_len``: best-fit decreasing
    (longest first, each into the fullest row it fits), so rows come out nearly full.

    Deterministic: ties are broken by index. Each group lists its indices in dataset order.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    # (room left, row index), sorted: the first entry with room >= n is the best fit
    room: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        if n < 1 or n > seq_len:
            raise ValueError(f"example {i} has {n} tokens; packing needs 1..{seq_len}")
        at = bisect.bisect_left(room, (n, -1))
        if at == len(room):
            rows.append([i])
            left, row = seq_len - n, len(rows) - 1
        else:
            left, row = room.pop(at)
            rows[row].append(i)
            left -= n
        if left > 0:
            bisect.insort(room, (left, row))
    return [sorted(r) for r in rows]


def pack_row(examples: Sequence[tuple[Sequence[int], Sequence[int]]]) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, labels, position_ids) of one packed row made of ``examples`` (ids, labels)."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex_ids, ex_labels in examples:
        if len(ex_ids) != len(ex_labels):
            raise ValueError(f"an example has {len(ex_ids)} ids but {len(ex_labels)} labels")
        ids.extend(ex_ids)
        labels.append(IGNORE_INDEX)  # never a target: see the module docstring
        labels.extend(ex_labels[1:])
        positions.extend(range(len(ex_ids)))
    return ids, labels, positions


def pack(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int
) -> list[tuple[list[int], list[int], list[int]]]:
    """Every example, packed: rows of (input_ids, labels, position_ids), each at most ``seq_len`` long."""
    plan = plan_packs([len(ids) for ids, _ in examples], seq_len)
    return [pack_row([examples[i] for i in row]) for row in plan]


def pack_features(features: Any, seq_len: int, path: str) -> Any:
    """``features`` (a tokenized ``datasets.Dataset`` with input_ids and labels) packed into a new
    Arrow file at ``path``, read back memory-mapped. Rows are gathered a chunk at a time."""
    import datasets
    import pyarrow.compute as pc
    from datasets.arrow_writer import ArrowWriter

    # lengths from Arrow's list offsets: the token lists themselves are read a chunk at a time below
    lengths = pc.list_value_length(features.data.column("input_ids")).to_pylist() if features.num_rows else []
    plan = plan_packs(lengths, seq_len)
    tmp = path + ".tmp"
    with ArrowWriter(path=tmp) as writer:
        for start in range(0, len(plan), PACK_CHUNK_ROWS):
            chunk = plan[start : start + PACK_CHUNK_ROWS]
            flat = [i for row in chunk for i in row]
            got = features[flat]  # one Arrow take for the chunk
            by_index = {i: (got["input_ids"][k], got["labels"][k]) for k, i in enumerate(flat)}
            packed = [pack_row([by_index[i] for i in row]) for row in chunk]
            writer.write_batch(
                {
                    "input_ids": [p[0] for p in packed],
                    "labels": [p[1] for p in packed],
                    "position_ids": [p[2] for p in packed],
                }
            )
        writer.finalize()
    os.replace(tmp, path)
    return datasets.Dataset.from_file(path)
