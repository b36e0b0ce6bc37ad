"""One record -> one sample for the collator: tokenised (ChatML, task templates or a preference pair), cut to
``data.max_len`` without cutting an image, its images decoded; or a drop marker saying why not.

``SampleBuilder`` writes the Qwen-VL model's tokens; ``FamilySampleBuilder`` a Hugging Face family's
(Qwen2-VL, Qwen2.5-VL, Qwen3-VL: data.hf_encode), each image sized by its own grid."""

from __future__ import annotations

import logging
from typing import Any

import torch

from data import stats
from data.chatml import render_chatml, render_preference_pair
from data.config import DataConfig
from data.formats import (
    PREFERENCE_KEYS,
    DataFormatError,
    empty_answer_turn,
    is_preference,
)
from data.hf_encode import (
    FamilySample,
    encode_conversation,
    encode_images,
    to_messages,
    truncate_family_sample,
)
from data.image_files import ImageLoadError, decode_image, open_image
from data.images import load_image
from data.sample import TokenizedSample, truncate_pair, truncate_span_safe
from data.templates import render_task
from data.text import token_id
from models.families.processor import set_pixel_budget
from models.tokens import ENDOFTEXT, IMG_END, IMG_START

logger = logging.getLogger(__name__)


class SampleBuilder:
    """One record -> a sample dict for the collator (or a drop marker). Shared by both dataset kinds."""

    def __init__(self, tokenizer, num_image_tokens: int, config: DataConfig) -> None:
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.config = config
        self.img_start, self.img_end = token_id(tokenizer, IMG_START), token_id(tokenizer, IMG_END)
        self.pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)

    def tokenize(self, record: dict, where: str) -> TokenizedSample:
        try:
            if "conversations" in record:
                return render_chatml(
                    self.tokenizer,
                    record["conversations"],
                    self.num_image_tokens,
                    self.config.system_message,
                    self.config.assistant_only,
                )
            return render_task(self.tokenizer, record, self.num_image_tokens)
        except ImageLoadError:
            raise  # a pixel box needed the image's size from its header: a bad image, not a bad record
        except (ValueError, KeyError, TypeError) as e:
            raise DataFormatError(f"{where}: {e}") from e

    def tokenize_pair(self, record: dict, where: str) -> tuple[TokenizedSample, TokenizedSample]:
        try:
            return render_preference_pair(
                self.tokenizer,
                record["conversations"],
                record["chosen"],
                record["rejected"],
                self.num_image_tokens,
                self.config.system_message,
            )
        except (ValueError, KeyError) as e:
            raise DataFormatError(f"{where}: {e}") from e

    def build(self, record: dict, where: str, image_bytes: dict[str, bytes] | None = None) -> dict:
        """The sample, or a drop marker. ``image_bytes``: images already in memory (WebDataset members), by
        the path the record names. A bad image never raises here: the marker carries the file to the main
        process, which counts distinct files against max_bad_images (ResumableLoader)."""
        if is_preference(record):
            return self.build_pair(record, where)
        empty_turn = empty_answer_turn(record)
        if empty_turn is not None:
            logger.warning("%s: dropped: the assistant answer of turn %d is empty", where, empty_turn)
            return {"dropped": stats.DROPPED_EMPTY_ANSWER}
        try:
            full = self.tokenize(record, where)
            sample = truncate_span_safe(full, self.config.max_len, self.img_start, self.img_end)
            if sample is None:
                logger.warning(
                    "%s: dropped: %d tokens, nothing supervised fits in max_len=%d without cutting an image",
                    where,
                    len(full),
                    self.config.max_len,
                )
                return {"dropped": stats.DROPPED_TOO_LONG}
            pixels = [
                load_image(p, self.config.image_size, where, data=(image_bytes or {}).get(p))
                for p in sample.image_paths
            ]
        except ImageLoadError as e:
            return bad_image_marker(e)
        s = self.config.image_size
        return {
            "input_ids": torch.tensor(sample.input_ids, dtype=torch.long),
            "labels": torch.tensor(sample.labels, dtype=torch.long),
            "pixel_values": torch.stack(pixels) if pixels else torch.zeros(0, 3, s, s),
            "truncated": len(sample) < len(full),
        }

    def build_pair(self, record: dict, where: str) -> dict:
        """A preference pair: chosen and rejected samples (answers cut at max_len; a pair that cannot fit
        is an error, data.sample.truncate_pair) sharing the prompt's decoded images."""
        chosen, rejected = self.tokenize_pair(record, where)
        try:
            chosen, rejected, truncated = truncate_pair(
                chosen, rejected, self.config.max_len, self.img_start, self.img_end
            )
        except ValueError as e:
            raise DataFormatError(f"{where}: {e}") from e
        try:
            pixels = [load_image(p, self.config.image_size, where) for p in chosen.image_paths]
        except ImageLoadError as e:
            return bad_image_marker(e)
        s = self.config.image_size
        images = {"pixel_values": torch.stack(pixels) if pixels else torch.zeros(0, 3, s, s)}
        return pair_item(chosen, rejected, truncated, images)


class FamilySampleBuilder:
    """One chat record -> a sample in a Hugging Face family's tokens (data.hf_encode), for the same collator:
    ``input_ids``, ``labels``, ``pixel_values`` (patch rows of the family's image processor, run here in the
    DataLoader worker), ``image_grid_thw`` (one (t, h, w) row per image) and ``truncated``; or a drop marker.

    The processor is given the data section's pixel budget (``data.min_pixels`` / ``data.max_pixels``) in
    place, so the export saves the budget training used. Chat records and preference pairs (the pair's
    sequences in the family's own chat template, ``build_pair``); task templates and pretraining captions
    are the Qwen-VL recipe's."""

    def __init__(self, processor, box_convention: str, config: DataConfig, mrope: Any = None) -> None:
        """``mrope``: the model's models.families.mrope.MRope, when the batches should carry their M-RoPE
        position ids (computed in the collator, in DataLoader workers); None leaves them to the model."""
        set_pixel_budget(processor, config.min_pixels, config.max_pixels)
        self.processor, self.box_convention, self.config = processor, box_convention, config
        self.mrope = mrope
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.img_start = tokenizer.convert_tokens_to_ids("<|vision_start|>")
        self.img_end = tokenizer.convert_tokens_to_ids("<|vision_end|>")

    def tokenize(self, record: dict, where: str, image_bytes: dict[str, bytes] | None = None):
        """The record's FamilySample, each image's grid from its header (no pixel decoded)."""
        if "conversations" not in record:
            raise DataFormatError(
                f"{where}: a Hugging Face family trains chat records (conversations); this record is a "
                "task or caption record of the Qwen-VL recipe"
            )
        return self._encode(record["conversations"], where, image_bytes)

    def tokenize_pair(
        self, record: dict, where: str, image_bytes: dict[str, bytes] | None = None
    ) -> tuple[FamilySample, FamilySample]:
        """A preference pair (data.formats: the prompt ``conversations`` ending with a user turn, the
        ``chosen`` and ``rejected`` answer texts) as two samples: the prompt followed by each answer, each the
        family's own chat template of that whole conversation, labels on the final answer only. Both show
        the prompt's images (an answer holding one is refused on load), with the same grids."""
        return tuple(
            self._encode(
                [*record["conversations"], {"from": "assistant", "value": record[key]}],
                where,
                image_bytes,
                answer_only=True,
            )
            for key in PREFERENCE_KEYS
        )

    def _encode(
        self,
        conversation: list[dict],
        where: str,
        image_bytes: dict[str, bytes] | None,
        answer_only: bool = False,
    ) -> FamilySample:
        try:
            sizes = []
            for path in to_messages(conversation)[1]:
                with open_image(path, where, (image_bytes or {}).get(path)) as image:
                    sizes.append(image.size)
            return encode_conversation(
                self.processor,
                conversation,
                sizes,
                self.box_convention,
                answer_only=answer_only,
                max_len=self.config.max_len,
            )
        except ImageLoadError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise DataFormatError(f"{where}: {e}") from e

    def build(self, record: dict, where: str, image_bytes: dict[str, bytes] | None = None) -> dict:
        if is_preference(record):
            return self.build_pair(record, where, image_bytes)
        empty_turn = empty_answer_turn(record)
        if empty_turn is not None:
            logger.warning("%s: dropped: the assistant answer of turn %d is empty", where, empty_turn)
            return {"dropped": stats.DROPPED_EMPTY_ANSWER}
        try:
            full = self.tokenize(record, where, image_bytes)
            sample = truncate_family_sample(full, self.config.max_len, self.img_start, self.img_end)
            if sample is None:
                logger.warning(
                    "%s: dropped: %d tokens, nothing supervised fits in max_len=%d without cutting an image",
                    where,
                    len(full),
                    self.config.max_len,
                )
                return {"dropped": stats.DROPPED_TOO_LONG}
            images = [decode_image(p, where, (image_bytes or {}).get(p)) for p in sample.image_paths]
        except ImageLoadError as e:
            return bad_image_marker(e)
        encoded = encode_images(self.processor, images)
        return {
            "input_ids": torch.tensor(sample.input_ids, dtype=torch.long),
            "labels": torch.tensor(sample.labels, dtype=torch.long),
            "pixel_values": encoded.get("pixel_values"),
            "image_grid_thw": encoded.get("image_grid_thw", torch.zeros(0, 3, dtype=torch.long)),
            "truncated": len(sample) < len(full),
        }

    def build_pair(self, record: dict, where: str, image_bytes: dict[str, bytes] | None = None) -> dict:
        """A preference pair, as ``SampleBuilder.build_pair``: answers cut at max_len (a pair that cannot
        fit is an error), the prompt's images decoded once for both sequences, with their grids."""
        try:
            chosen, rejected = self.tokenize_pair(record, where, image_bytes)
            try:
                # Images sit in the prompt, which truncate_pair never cuts: both keep every image and grid.
                chosen, rejected, truncated = truncate_pair(
                    chosen, rejected, self.config.max_len, self.img_start, self.img_end
                )
            except ValueError as e:
                raise DataFormatError(f"{where}: {e}") from e
            images = [decode_image(p, where, (image_bytes or {}).get(p)) for p in chosen.image_paths]
        except ImageLoadError as e:
            return bad_image_marker(e)
        encoded = encode_images(self.processor, images)
        images = {
            "pixel_values": encoded.get("pixel_values"),
            "image_grid_thw": encoded.get("image_grid_thw", torch.zeros(0, 3, dtype=torch.long)),
        }
        return pair_item(chosen, rejected, truncated, images)


def pair_item(chosen: TokenizedSample, rejected: TokenizedSample, truncated: bool, images: dict) -> dict:
    """The collator's item of a preference pair (data.collate): both sequences, and the images of their
    shared prompt once (``images``: ``pixel_values``, and a family's ``image_grid_thw``)."""
    return {
        "chosen": {"input_ids": torch.tensor(chosen.input_ids), "labels": torch.tensor(chosen.labels)},
        "rejected": {"input_ids": torch.tensor(rejected.input_ids), "labels": torch.tensor(rejected.labels)},
        **images,
        "truncated": truncated,
    }


def bad_image_marker(error: ImageLoadError) -> dict:
    """The drop marker of a sample whose image is missing or undecodable, with the file and the message."""
    return {"dropped": stats.DROPPED_BAD_IMAGE, "bad_image": (error.path or str(error), str(error))}
