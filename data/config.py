"""The ``data:`` section of a recipe: its fields, defaults and its own rules (``DataConfig.validate``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from data.chatml import DEFAULT_SYSTEM_MESSAGE
from data.webdataset import (
    DEFAULT_CAPTION_KEY,
    DEFAULT_IMAGE_KEYS,
)


@dataclass
class DataConfig:
    """What the trainer's recipe says about data (the ``data:`` section of a recipe)."""

    # data files; several are concatenated (map-style) or streamed as shards. Streamed: brace patterns
    # (/data/laion/{00000..01023}.tar) and fsspec URLs are expanded/opened (data.shards)
    paths: list[str]
    format: str = "auto"  # auto | qwen | llava | multitask | pretrain (see data.formats) | webdataset
    image_size: int = 448  # 224 in the first pretraining stage of the recipe, 448 afterwards
    image_root: str | None = None  # relative image paths resolve here, else next to the data file
    max_len: int = 2048
    # Hugging Face families (model.family: qwen2_vl, qwen2_5_vl, qwen3_vl) only: the pixel budget of one
    # image. Each image is resized within it to multiples of 28 (32 for Qwen3-VL) and takes one token per 2x2
    # patches; None keeps the family's released preprocessor_config value. data.image_size is the Qwen-VL
    # model's.
    min_pixels: int | None = None
    max_pixels: int | None = None
    packing: bool = False  # several samples per row (data.packing) instead of one padded sample per row
    # With packing: row capacity in tokens (default max_len, which stays the per-sample limit). Rows are
    # padded to the longest of the micro-batch, so longer rows mean less padding (11-13% at max_len 2048
    # and 24 SFT samples per micro-batch; 0 when a micro-batch fits one row). Needs varlen/flex attention.
    pack_len: int | None = None
    group_by_length: bool = False  # length-grouped sampling: the alternative to packing (map-style only)
    num_workers: int = 2
    # Distinct image files (webdataset: samples) that may be missing or undecodable: the samples using them
    # are skipped (counted, logged); one more stops the run. 0 = the first one does. Missing files are found
    # when the data is loaded, undecodable ones when a worker first reads them (each file counts once).
    max_bad_images: int = 0
    assistant_only: bool = False  # chat: supervise assistant content + <|im_end|> only
    system_message: str = DEFAULT_SYSTEM_MESSAGE
    seed: int = 0
    shuffle: bool = True
    streaming: bool = False  # pretraining pairs read shard by shard (data.streaming); webdataset implies it
    shuffle_buffer: int = (
        1000  # streaming: records each DataLoader worker mixes (held in memory; re-read on resume)
    )
    image_column: str = "image"
    caption_column: str = "caption"
    wds_image_keys: str = DEFAULT_IMAGE_KEYS  # webdataset: image member extensions, the first present is used
    wds_caption_key: str = (
        DEFAULT_CAPTION_KEY  # webdataset: caption member ("txt"), or "json:caption" for a JSON field
    )

    # The dataset check (python -m data.check) run by the trainer before the model is built, on rank 0:
    # fast = records, tokens, tags, truncation, duplicates, images exist; full = + every image decoded.
    check: Literal["off", "fast", "full"] = "fast"
    check_max_error_fraction: float = 0.001  # the check fails when more records than this have an error

    def __post_init__(self) -> None:
        if self.format == "webdataset":
            self.streaming = True

    @property
    def row_len(self) -> int:
        """Tokens one batch row holds: pack_len when packing into longer rows, else max_len (one sample's
        limit, which is also a packed row's by default)."""
        return self.pack_len or self.max_len

    def check_token_batches(self) -> None:
        """Raise ValueError unless micro-batches bounded by tokens (train.micro_batch_tokens) can be formed
        here: they need every sample's length before the epoch starts, so packed map-style data."""
        if self.streaming or not self.packing:
            raise ValueError(
                "'train.micro_batch_tokens' bounds micro-batches of packed map-style data: set "
                "'data.packing: true' and 'data.streaming: false', or leave it unset"
            )

    def validate(self) -> None:
        """Raise ValueError naming the key when the section contradicts itself (the recipe loader adds the
        file; rules that involve other sections are the recipe's, train/recipe.py)."""
        if self.pack_len is not None:
            if not self.packing:
                raise ValueError("'data.pack_len' needs 'data.packing: true'")
            if self.pack_len < self.max_len:
                raise ValueError(
                    f"'data.pack_len' ({self.pack_len}) must be >= 'data.max_len' ({self.max_len})"
                )
