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
    batch.update(concat_images([p for _, p in items]))
    return batch


def concat_images(per_sample: list[dict]) -> dict[str, torch.Tensor]:
    """The images of samples in order: ``pixel_values`` (their patch rows concatenated) and ``image_grid_thw``
    (one row per image); {} when no sample has an image (the model then runs no image through the ViT).
    ``per_sample``: each sample's ``encode_images`` output or any dict holding those two keys."""
    with_images = [
        p for p in per_sample if p and p.get("pixel_values") is not None and len(p["pixel_values"])
    ]
    if not with_images:
        return {}
    return {
        "pixel_values": torch.cat([p["pixel_values"] for p in with_images]),
        "image_grid_thw": torch.cat([p["image_grid_thw"] for p in with_images]),
    }
