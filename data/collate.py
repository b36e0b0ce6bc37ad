"""Batch assembly: samples from the dataset (or drop markers) -> the batch dict of
docs/design.md section 2."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from data import stats
from data.hf_collate import concat_images
from data.packing import pack, pad, supervised_positions


@dataclass
class Collator:
    """Runs in DataLoader workers. ``packing=False``: dynamic right padding with ``attention_mask``;
    ``packing=True``: several samples per row up to ``row_len`` tokens (data.packing), no attention mask.

    Dataset items are either samples (``input_ids``, ``labels``, ``pixel_values``, ``truncated``; a Hugging
    Face family's also ``image_grid_thw``, its ``pixel_values`` patch rows, data.hf_collate),
    preference pairs (``chosen`` and ``rejected`` samples sharing ``pixel_values``, ``truncated``, ``index``)
    or drop markers (``{"dropped": counter_name}``, with ``"bad_image": (file, message)`` for a bad image).
    The returned dict has the contract keys plus ``_stats`` (counts of this batch) and ``_bad_images`` (the
    (file, message) of each sample dropped for a bad image), both removed by the loader, and is
    ``None``-free: a batch whose samples were all dropped has ``num_samples == 0`` and no tensors, and the
    loader skips it.

    A batch of pairs holds 2 sequences per pair, chosen then rejected; with packing a pair shares a row. Both
    sequences show the prompt's images (an answer holding one is refused on load, data.formats), which
    ``pixel_values`` holds once per pair: ``image_index`` maps each
    image span (in order of appearance) to its row of ``pixel_values``, so the vision tower and resampler
    encode a pair's images once, not once per sequence. A family's pairs carry their images once per
    sequence instead (``pixel_values`` patch rows and ``image_grid_thw`` rows in the order of the spans, no
    ``image_index``): HFFamilyModel encodes each span's image itself. It adds ``sequence_ids`` (data.packing),
    ``num_pairs`` and ``pair_index`` (the pairs' dataset indices, for precomputed reference log-probs);
    ``num_samples`` and ``sample_lengths`` count sequences.
    """

    pad_id: int
    image_size: int
    row_len: int  # tokens a packed row holds (DataConfig.row_len; unused without packing)
    packing: bool = False
    # A family's M-RoPE (models.families.mrope.MRope): its position ids ([4, B, L] packed, [3, B, L] padded)
    # are computed here, in the workers, not in the training step. None: the model computes them.
    mrope: Any = None

    def __call__(self, items: list[dict]) -> dict:
        counters = (stats.SAMPLES, stats.TRUNCATED, *stats.SAMPLER_DROPS, stats.DROPPED_BAD_SAMPLE)
        counts = dict.fromkeys(counters, 0)
        samples, bad_images = [], []
        for item in items:
            if "dropped" in item:
                counts[item["dropped"]] += 1
                if "bad_image" in item:
                    bad_images.append(item["bad_image"])
            else:
                samples.append(item)
                counts[stats.TRUNCATED] += int(item.get("truncated", False))
        counts[stats.SAMPLES] = len(samples)
        if not samples:
            return {"num_samples": 0, "_stats": counts, "_bad_images": bad_images}
        pairs = [s for s in samples if "chosen" in s]
        family = "image_grid_thw" in samples[0]  # a Hugging Face family's samples (FamilySampleBuilder)
        if pairs:
            if len(pairs) != len(samples):
                raise ValueError("a batch mixes preference pairs and plain samples")
            images = ("pixel_values", "image_grid_thw") if family else ("pixel_values",)
            samples = [
                {**s[key], **{k: s[k] for k in images}} for s in pairs for key in ("chosen", "rejected")
            ]
        if self.packing:
            batch = pack(
                samples, self.row_len, self.pad_id, group=2 if pairs else 1, sequence_ids=bool(pairs)
            )
        else:
            batch = pad(samples, self.pad_id, sequence_ids=bool(pairs))
        if pairs:  # DPO needs every position's log-prob (train.dpo): no label_positions
            batch["num_pairs"] = len(pairs)
            batch["pair_index"] = torch.tensor([s.get("index", -1) for s in pairs], dtype=torch.long)
        else:
            batch["label_positions"] = supervised_positions(batch["labels"])
        if family:  # each sequence's images, a pair's twice (HFFamilyModel encodes every span's own)
            batch.update(concat_images(samples))
            batch.setdefault("pixel_values", None)  # text only: the model runs no image
            if self.mrope is not None:
                grids = batch.get("image_grid_thw")
                batch["position_ids"] = (
                    self.mrope.packed(batch["input_ids"], grids, batch["cu_seq_lens"])
                    if self.packing
                    else self.mrope.padded(batch["input_ids"], grids, batch["attention_mask"])
                )
        else:
            pixels = [s["pixel_values"] for s in (pairs or samples) if len(s["pixel_values"])]
            batch["pixel_values"] = (
                torch.cat(pixels) if pixels else torch.zeros(0, 3, self.image_size, self.image_size)
            )
        if pairs and not family:
            batch["image_index"] = pair_image_index([len(s["pixel_values"]) for s in pairs])
        batch["num_samples"] = len(samples)
        batch["sample_lengths"] = [len(s["input_ids"]) for s in samples]  # host ints: token counts, FLOPs
        batch["_stats"] = counts
        batch["_bad_images"] = bad_images
        return batch


def pair_image_index(images_per_pair: list[int]) -> torch.Tensor:
    """[image spans] long: each span's row of the pairs' ``pixel_values`` (each pair's images once). The
    spans come in the order of the sequences, chosen then rejected of each pair, and both sequences of a
    pair show the same images: [0, 1, 0, 1, 2, 2] for pairs of 2 and 1 images."""
    index, first = [], 0
    for n in images_per_pair:
        index += [*range(first, first + n)] * 2
        first += n
    return torch.tensor(index, dtype=torch.long)


def count_images(batch: dict) -> int:
    """Images in a batch: rows of ``image_grid_thw`` for a family's batch (its pixel rows are patches), else
    of ``pixel_values``."""
    if "image_grid_thw" in batch:
        return len(batch["image_grid_thw"])
    return 0 if batch.get("pixel_values") is None else len(batch["pixel_values"])


def split_rows(batch: dict, max_tokens: int | None, image_start_id: int) -> list[dict]:
    """A host-side batch cut into forward passes of whole rows, each at most ``max_tokens`` tokens (one
    row when a row alone is longer): the trainer's ``train.max_forward_tokens``, which bounds activation
    memory whatever the samples' lengths while the loss stays that of the whole step (the loop
    normalises by the step's supervised tokens). Returns ``[batch]`` when it fits. Each part keeps the
    keys the forward reads: ids, labels, positions, mask, its images, and its own sample boundaries and
    supervised positions; a batch of preference pairs is cut between pairs (a padded pair's two rows stay
    together) and each part gets its own pairs' ``sequence_ids`` (renumbered from 0), ``num_pairs`` and
    ``pair_index``."""
    rows, width = batch["input_ids"].shape
    per_forward = max(1, (max_tokens or rows * width) // width)
    if "sequence_ids" in batch and "attention_mask" in batch:  # padded pairs: one sequence per row
        per_forward = max(2, per_forward - per_forward % 2)
    if per_forward >= rows:
        return [batch]
    images_per_row = (batch["input_ids"] == image_start_id).sum(1).tolist()
    parts, first_span = [], 0
    for r0 in range(0, rows, per_forward):
        r1 = min(rows, r0 + per_forward)
        part = {k: batch[k][r0:r1] for k in ("input_ids", "labels", "attention_mask") if k in batch}
        if "position_ids" in batch:  # [B, L], or a family's M-RoPE rows [3 or 4, B, L]
            positions = batch["position_ids"]
            part["position_ids"] = positions[r0:r1] if positions.dim() == 2 else positions[:, r0:r1]
        n_spans = sum(images_per_row[r0:r1])
        if "image_index" in batch:  # pairs: the part's spans point into a contiguous run of images
            index = batch["image_index"][first_span : first_span + n_spans]
            first, end = (int(index.min()), int(index.max()) + 1) if n_spans else (0, 0)
            part["image_index"] = index - first
            part["pixel_values"] = batch["pixel_values"][first:end]
        elif "image_grid_thw" in batch:  # a family's images: patch rows, one grid row per image
            grids = batch["image_grid_thw"]
            first_row = int(grids[:first_span].prod(-1).sum())
            num_rows = int(grids[first_span : first_span + n_spans].prod(-1).sum())
            part["image_grid_thw"] = grids[first_span : first_span + n_spans]
            part["pixel_values"] = (
                batch["pixel_values"][first_row : first_row + num_rows] if n_spans else None
            )
        elif batch["pixel_values"] is None:  # a family's text-only batch
            part["pixel_values"] = None
        else:
            part["pixel_values"] = batch["pixel_values"][first_span : first_span + n_spans]
        first_span += n_spans
        if "cu_seq_lens" in batch:  # every row starts a segment, so the part's rows are whole segments
            cu = batch["cu_seq_lens"]
            cu = cu[(cu >= r0 * width) & (cu <= r1 * width)] - r0 * width
            part["cu_seq_lens"], part["max_length"] = cu, int((cu[1:] - cu[:-1]).max())
        if "label_positions" in batch:
            part["label_positions"] = supervised_positions(part["labels"])
        if "sequence_ids" in batch:  # the part's pairs: sequences first..last (rows hold whole pairs)
            seq = batch["sequence_ids"][r0:r1]
            first, last = int(seq[seq >= 0].min()), int(seq.max())
            part["sequence_ids"] = torch.where(seq >= 0, seq - first, seq)
            part["num_pairs"] = (last - first + 1) // 2
            part["pair_index"] = batch["pair_index"][first // 2 : (last + 1) // 2]
        parts.append(part)
    return parts


def to_device(batch: dict[str, Any], device: torch.device, pixel_dtype: torch.dtype | None) -> dict[str, Any]:
    """A host batch on ``device`` (copies overlap with compute), its images in ``pixel_dtype`` when given."""
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if pixel_dtype is not None and out.get("pixel_values") is not None:
        out["pixel_values"] = out["pixel_values"].to(pixel_dtype)
    return out
