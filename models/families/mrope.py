"""M-RoPE position ids of a Hugging Face family, computed without the model, so DataLoader workers can.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL place text on one axis and each image's merged patches on a (t, h, w) grid
(reference qwen2-vl-family.md, section 5). transformers computes this in the model's ``get_rope_index``, a
Python loop over samples and images with host round trips (``.tolist()``, ``.item()``). Run inside the
training step it stalls the GPU once per forward; run in the collator it costs the step nothing.

transformers has no model-free entry to it, so ``MRope`` calls the model class's own ``get_rope_index`` on a
host object that holds only the config (all that the method reads, besides its sibling
``get_vision_position_ids``); tests/test_model_families.py holds the result equal to the model's method for
every family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig


@dataclass(frozen=True)
class ImagePlaceholder:
    """An image in the token stream: ``start`` + one ``pad`` per merged patch + ``end``."""

    start: int  # <|vision_start|>
    pad: int  # <|image_pad|>: the slots the vision features replace
    end: int  # <|vision_end|>


class MRope:
    """Position ids of padded rows ([3, B, L]) or packed rows ([4, B, L]) for one family's config.
    ``model_class``: the class of the HF model's inner model (``type(hf_model.model)``), which owns
    ``get_rope_index``. Picklable (it travels to DataLoader workers)."""

    def __init__(self, model_class: type, config: PretrainedConfig) -> None:
        self.model_class, self.config = model_class, config
        self.placeholder = ImagePlaceholder(
            start=config.vision_start_token_id, pad=config.image_token_id, end=config.vision_end_token_id
        )
        self._host = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_host": None}  # the host is rebuilt where it is used

    def _rope_index(self, *args, **kwargs):
        if self._host is None:
            # The inner model's class without its __init__ (no weights): get_rope_index reads self.config,
            # found in the instance dict before nn.Module's attribute lookup.
            self._host = object.__new__(self.model_class)
            self._host.__dict__["config"] = self.config
        return self.model_class.get_rope_index(self._host, *args, **kwargs)

    def mm_token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """1 on image slots, 0 elsewhere: what transformers 5.x's M-RoPE uses to find image runs (videos,
        type 2, are not supported by the recipe)."""
        return (input_ids == self.placeholder.pad).int()

    def padded(
        self,
        input_ids: torch.Tensor,
        image_grid_thw: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """M-RoPE position ids [3, B, L] (temporal, height, width) by the model class's ``get_rope_index``.

        Text advances all three rows by one per token; an image's slots take (t, h, w) grid coordinates
        from its start, and the text after it resumes at start + max(h, w) / merge. Padded slots
        (attention_mask 0) get 0. A batch without images gets ``arange`` in every row.
        """
        if image_grid_thw is None or not len(image_grid_thw):
            if attention_mask is None:
                positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            else:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) * attention_mask.long()
            return positions.unsqueeze(0).expand(3, -1, -1).clone()
        positions, _ = self._rope_index(
            input_ids,
            mm_token_type_ids=self.mm_token_type_ids(input_ids),
            image_grid_thw=image_grid_thw,
            attention_mask=attention_mask,
        )
        return positions

    def packed(
        self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, cu_seq_lens: torch.Tensor
    ) -> torch.Tensor:
        """Position ids [4, B, L] of packed rows: row 0 the text positions restarting at 0 in every sample
        (transformers builds the per-sample causal mask, or the varlen boundaries, from it), rows 1-3 each
        sample's own M-RoPE, as if it were alone. ``cu_seq_lens``: sample boundaries over the flattened rows
        (data.packing.pack; a row's padding is a segment of its own). Images are taken from
        ``image_grid_thw`` in order of appearance. Computed on the host (one copy of the ids, where they are
        not there already)."""
        flat_ids = input_ids.reshape(-1).cpu()
        bounds = cu_seq_lens.tolist()
        grids = image_grid_thw.cpu() if image_grid_thw is not None else torch.zeros(0, 3, dtype=torch.long)
        text = torch.zeros_like(flat_ids)
        mrope = torch.zeros(3, flat_ids.numel(), dtype=torch.long)
        next_image = 0
        for start, end in zip(bounds, bounds[1:]):
            segment = flat_ids[start:end]
            num_images = int((segment == self.placeholder.start).sum())
            text[start:end] = torch.arange(end - start)
            images = grids[next_image : next_image + num_images]
            mrope[:, start:end] = self.padded(segment[None], images)[:, 0]
            next_image += num_images
        if next_image != len(grids):
            raise ValueError(f"the packed rows hold {next_image} images but image_grid_thw has {len(grids)}")
        rows = torch.cat([text[None], mrope]).view(4, *input_ids.shape)
        return rows.to(input_ids.device)
