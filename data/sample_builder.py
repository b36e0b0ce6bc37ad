"""One record -> one sample for the collator: tokenised (ChatML, task templates or a preference pair), cut to
``data.max_len`` without cutting an image, its images decoded; or a drop marker saying why not."""

from __future__ import annotations

import logging

import torch

from data import stats
from data.chatml import render_chatml, render_preference_pair
from data.config import DataConfig
from data.formats import (
    DataFormatError,
    empty_answer_turn,
    is_preference,
)
from data.images import ImageLoadError, load_image
from data.sample import TokenizedSample, truncate_pair, truncate_span_safe
from data.templates import render_task
from data.text import token_id
from models.tokens import IMG_END, IMG_START

logger = logging.getLogger(__name__)


class SampleBuilder:
    """One record -> a sample dict for the collator (or a drop marker). Shared by both dataset kinds."""

    def __init__(self, tokenizer, num_image_tokens: int, config: DataConfig) -> None:
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.config = config
        self.img_start, self.img_end = token_id(tokenizer, IMG_START), token_id(tokenizer, IMG_END)

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
        return {
            "chosen": {"input_ids": torch.tensor(chosen.input_ids), "labels": torch.tensor(chosen.labels)},
            "rejected": {
                "input_ids": torch.tensor(rejected.input_ids),
                "labels": torch.tensor(rejected.labels),
            },
            "pixel_values": torch.stack(pixels) if pixels else torch.zeros(0, 3, s, s),
            "truncated": truncated,
        }


def bad_image_marker(error: ImageLoadError) -> dict:
    """The drop marker of a sample whose image is missing or undecodable, with the file and the message."""
    return {"dropped": stats.DROPPED_BAD_IMAGE, "bad_image": (error.path or str(error), str(error))}
