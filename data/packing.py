"""Packing several samples into one row (the alternative to padding every sample to the longest).

Contract (docs/design.md, "Packing"): samples are placed in order, a new row starting when the next
sample does not fit in ``max_len``; each sample's ``position_ids`` restart at 0, which is the boundary
marker the model uses to keep attention inside a sample; the padding at the end of a row is its own
segment (positions restarting at 0, labels -100, input ids = pad id). Images stay in order of
appearance (row by row, left to right) because samples keep their order.

Preference pairs (DPO) come as consecutive samples (chosen, rejected) with ``group=2``: a pair always
shares a row. With ``sequence_ids=True`` the batch also says which sample each position belongs to
(``sequence_ids`` [rows, L]: the sample's index in ``samples``, -1 on padding), so per-sequence sums of
token log-probabilities can be taken in one ``index_add`` (models.loss.sum_per_sequence).
"""

from __future__ import annotations

import torch

from data.sample import IGNORE_INDEX


def plan_rows(lengths: list[int], max_len: int, group: int = 1) -> list[list[int]]:
    """Group sample indices into rows, in order, greedily: a row closes when the next sample would overflow.
    ``group`` consecutive samples (2: a preference pair) are placed as one unit, in the same row."""
    rows: list[list[int]] = []
    used = max_len  # forces a new row for the first sample
    for first in range(0, len(lengths), group):
        unit = list(range(first, min(first + group, len(lengths))))
        n = sum(lengths[i] for i in unit)
        if n > max_len:
            what = f"sample {first}" if group == 1 else f"samples {unit[0]}-{unit[-1]} (placed together)"
            raise ValueError(f"{what} has {n} tokens > max_len {max_len}; truncate it first")
        if used + n > max_len:
            rows.append([])
            used = 0
        rows[-1] += unit
        used += n
    return rows


def pack(
    samples: list[dict], max_len: int, pad_id: int, group: int = 1, sequence_ids: bool = False
) -> dict[str, torch.Tensor]:
    """Pack tokenised samples (dicts with 1-D ``input_ids``/``labels``) into rows of equal length.

    Rows are right-padded to the longest row (not to max_len: no row of pure padding is computed).
    Returns ``input_ids``, ``labels``, ``position_ids`` (and ``sequence_ids``) of shape [num_rows, L], and
    the sample boundaries over the flattened rows for varlen attention: ``cu_seq_lens`` (int32 [segments + 1];
    a row's padding is its own segment) and ``max_length`` (the longest segment, a host int). Computing them
    here, in the DataLoader worker, spares the forward a device->host sync.
    """
    rows = plan_rows([len(s["input_ids"]) for s in samples], max_len, group)
    width = max(sum(len(samples[i]["input_ids"]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segments: list[int] = []
    seq_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = len(samples[i]["input_ids"])
            input_ids[r, start : start + n] = samples[i]["input_ids"]
            labels[r, start : start + n] = samples[i]["labels"]
            position_ids[r, start : start + n] = torch.arange(n)
            seq_ids[r, start : start + n] = i
            segments.append(n)
            start += n
        position_ids[r, start:] = torch.arange(width - start)  # the padding is its own segment
        if width > start:
            segments.append(width - start)
    cu_seq_lens = torch.tensor([0] + segments, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seq_lens": cu_seq_lens,
        "max_length": max(segments),
    }
    return {**batch, "sequence_ids": seq_ids} if sequence_ids else batch


def pad(samples: list[dict], pad_id: int, sequence_ids: bool = False) -> dict[str, torch.Tensor]:
    """One sample per row, right-padded to the longest (dynamic padding), with an attention mask."""
    width = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for r, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[r, :n] = s["input_ids"]
        labels[r, :n] = s["labels"]
        attention_mask[r, :n] = 1
    position_ids = torch.arange(width).expand(len(samples), width).clone()
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
    }
    if sequence_ids:  # row r holds sample r
        batch["sequence_ids"] = torch.where(attention_mask.bool(), torch.arange(len(samples))[:, None], -1)
    return batch


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """The flat indices into [B * L] of the labels a causal LM predicts (not -100, not in column 0: nothing
    precedes it in its row). The collator ships them as ``label_positions`` so that the loss computes the LM
    head only there (models.loss.causal_lm_loss_sum) without searching for them on the GPU (a host sync)."""
    predicted = labels != IGNORE_INDEX
    predicted[:, 0] = False
    return predicted.reshape(-1).nonzero().squeeze(1)
