"""Batches of data.hf_encode samples for a HF family model: padded rows or packed rows.

The token tensors are laid out by data.packing (``pad``: one sample per row with an attention mask;
``pack``: samples in order, positions restarting at 0, ``cu_seq_lens`` boundaries). The images follow the
samples' order, which is the order of their placeholder spans in the flattened rows: ``pixel_values`` are
concatenated (rows of patches, as the family's image processor makes them) and ``image_grid_thw`` lists one
grid per image. M-RoPE positions are left to the model (models.families.adapter.HFFamilyModel.forward),
which computes them per sample with the family's own ``get_rope_index``.
"""

from __future__ import annotations

import torch

from data.hf_encode import FamilySample
from data.packing import pack, pad


def collate_family_batch(
    items: list[tuple[FamilySample, dict]], pad_id: int, pack_to: int | None = None
) -> dict[str, torch.Tensor]:
    """``items``: (sample, its ``encode_images`` output) pairs. ``pack_to``: pack into rows of at most this
    many tokens; None pads one sample per row. Returns the model's keyword arguments."""
    samples = [{"input_ids": torch.tensor(s.input_ids), "labels": torch.tensor(s.labels)} for s, _ in items]
    batch = pad(samples, pad_id) if pack_to is None else pack(samples, pack_to, pad_id)
    if pack_to is None:
        del batch["position_ids"]  # 1-D positions; the model computes M-RoPE from the mask
    pixels = [p for _, p in items if p]
    if pixels:
        batch["pixel_values"] = torch.cat([p["pixel_values"] for p in pixels])
        batch["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in pixels])
    return batch
