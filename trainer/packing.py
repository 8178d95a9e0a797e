"""Sequence packing: several QA pairs per fixed-length row, attention kept inside each pair.

Rows carry ``position_ids`` that restart at 0 for every pair and no attention mask.
transformers (``masking_utils.find_packed_sequence_indices``) turns restarting positions
into a document mask, so with ``attn_implementation="flex_attention"`` no token attends
across pairs and cross-pair blocks are skipped (``"varlen"``: trainer/attention.py); padding
is one more "pair" whose labels are ignored. Packing removes the ~40% padding of
length-bucketed batches on MedQuAD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from trainer.attention import cu_seq_lens

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """One tokenized pair: prompt + answer ids, labels IGNORE on the prompt."""

    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class PackedRow:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    real_tokens: int
    """Tokens before the padding tail."""
    members: tuple[int, ...] = ()
    """Indices (into the packed list) of the examples in this row, in row order."""


def pack_examples(examples: Sequence[Example], row_len: int, pad_id: int) -> list[PackedRow]:
    """First-fit-decreasing bin packing into rows of exactly ``row_len`` tokens.

    Examples longer than a row are truncated (their answer tail is lost, as with
    padded truncation). Deterministic for a given input order.
    """
    if row_len < 2:
        raise ValueError(f"row_len must be >= 2, got {row_len}")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    bins: list[list[int]] = []
    free = np.zeros(len(examples), dtype=np.int64)  # room left in each opened bin; at most one bin per example
    for i in order:
        size = min(len(examples[i].input_ids), row_len)
        fits = free[: len(bins)] >= size
        slot = int(fits.argmax()) if fits.any() else None  # the first bin with room, found in C
        if slot is None:
            bins.append([])
            free[len(bins) - 1] = row_len
            slot = len(bins) - 1
        bins[slot].append(i)
        free[slot] -= size
    return [_fill_row(examples, members, row_len, pad_id) for members in bins]


def _fill_row(examples: Sequence[Example], members: list[int], row_len: int, pad_id: int) -> PackedRow:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for i in members:
        ex = examples[i]
        n = min(len(ex.input_ids), row_len)
        ids += ex.input_ids[:n]
        # The first token of a pair is never a target: its left neighbour belongs to another pair.
        labels += [IGNORE] + ex.labels[1:n]
        positions += list(range(n))
    pad = row_len - len(ids)
    ids += [pad_id] * pad
    labels += [IGNORE] * pad
    positions += list(range(pad))
    return PackedRow(ids, labels, positions, real_tokens=row_len - pad, members=tuple(members))


def blank_row(row_len: int, pad_id: int) -> PackedRow:
    """A row of padding only: fills a short last batch to full size without adding a scored token."""
    return _fill_row([], [], row_len, pad_id)


def collate_packed(rows: Sequence[PackedRow]) -> dict[str, torch.Tensor]:
    """Stack rows into a batch; no attention_mask, so the model derives the document mask.

    ``cu_seq_lens`` (pair offsets in the flattened batch) is for varlen attention; made here, in
    the loader, so the training step needs no host sync to find the pairs.
    """
    position_ids = torch.tensor([r.position_ids for r in rows], dtype=torch.long)
    return {
        "input_ids": torch.tensor([r.input_ids for r in rows], dtype=torch.long),
        "labels": torch.tensor([r.labels for r in rows], dtype=torch.long),
        "position_ids": position_ids,
        "cu_seq_lens": cu_seq_lens(position_ids),
        "num_tokens": torch.tensor(sum(r.real_tokens for r in rows), dtype=torch.long),
    }


def packing_efficiency(rows: Sequence[PackedRow]) -> float:
    """Share of row tokens that belong to a pair rather than padding."""
    total = sum(len(r.input_ids) for r in rows)
    return sum(r.real_tokens for r in rows) / total if total else 0.0
