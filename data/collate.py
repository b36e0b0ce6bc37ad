"""Batch assembly: samples from the dataset (or drop markers) -> the batch dict of docs/design.md section 2."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data import stats
from data.packing import pack, pad


@dataclass
class Collator:
    """Runs in DataLoader workers. ``packing=False``: dynamic right padding with ``attention_mask``;
    ``packing=True``: several samples per row up to ``max_len`` (data.packing), no attention mask.

    Dataset items are either samples (``input_ids``, ``labels``, ``pixel_values``, ``truncated``) or drop
    markers (``{"dropped": counter_name}``). The returned dict has the contract keys plus ``_stats``
    (counts of this batch; the loader removes it) and is ``None``-free: a batch whose samples were all
    dropped has ``num_samples == 0`` and no tensors, and the loader skips it.
    """

    pad_id: int
    image_size: int
    max_len: int
    packing: bool = False

    def __call__(self, items: list[dict]) -> dict:
        counts = {stats.SAMPLES: 0, stats.TRUNCATED: 0, stats.DROPPED_TOO_LONG: 0, stats.DROPPED_BAD_IMAGE: 0}
        samples = []
        for item in items:
            if "dropped" in item:
                counts[item["dropped"]] += 1
            else:
                samples.append(item)
                counts[stats.TRUNCATED] += int(item.get("truncated", False))
        counts[stats.SAMPLES] = len(samples)
        if not samples:
            return {"num_samples": 0, "_stats": counts}
        batch = pack(samples, self.max_len, self.pad_id) if self.packing else pad(samples, self.pad_id)
        pixels = [s["pixel_values"] for s in samples if len(s["pixel_values"])]
        batch["pixel_values"] = (torch.cat(pixels) if pixels
                                 else torch.zeros(0, 3, self.image_size, self.image_size))
        batch["num_samples"] = len(samples)
        batch["sample_lengths"] = [len(s["input_ids"]) for s in samples]  # host ints: token counts, FLOPs
        batch["_stats"] = counts
        return batch
