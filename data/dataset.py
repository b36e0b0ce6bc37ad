"""Records -> tokenised samples with pixels -> batches: the datasets and ``build_dataloader``.

Tokenisation happens lazily in ``__getitem__`` and image decoding therefore in DataLoader workers.
The trainer calls one function::

    loader = build_dataloader(DataConfig(paths=["train.json"], image_size=448, max_len=2048),
                              tokenizer, num_image_tokens=256, batch_size=8, rank=r, world_size=w)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader: ...           # the batch dict of docs/design.md section 2
        loader.stats.total                 # counters (also logged at the end of every epoch)
    ckpt["data"] = loader.state_dict()     # position inside the epoch; loader.load_state_dict(...) resumes
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from data import stats
from data.chatml import DEFAULT_SYSTEM_MESSAGE, render_chatml
from data.collate import Collator
from data.formats import DataFormatError, load_pretrain_pairs, load_records, normalize_record
from data.images import ImageLoadError, load_image
from data.sample import TokenizedSample, truncate_span_safe
from data.sampler import ResumableSampler
from data.templates import render_task
from data.text import token_id
from models.tokens import ENDOFTEXT, IMG_END, IMG_START

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """What the trainer's recipe says about data (the ``data:`` section of a recipe)."""

    paths: list[str]  # data files; several are concatenated (map-style) or streamed one after another
    format: str = "auto"  # auto | qwen | llava | multitask | pretrain (see data.formats)
    image_size: int = 448  # 224 in the first pretraining stage of the recipe, 448 afterwards
    image_root: str | None = None  # relative image paths resolve here, else next to the data file
    max_len: int = 2048
    packing: bool = False  # several samples per row (data.packing) instead of one padded sample per row
    # With packing: row capacity in tokens (default max_len, which stays the per-sample limit). Rows are
    # padded to the longest of the micro-batch, so longer rows mean less padding (11-13% at max_len 2048
    # and 24 SFT samples per micro-batch; 0 when a micro-batch fits one row). Needs varlen/flex attention.
    pack_len: int | None = None
    group_by_length: bool = False  # length-grouped sampling: the alternative to packing (map-style only)
    num_workers: int = 2
    max_bad_images: int = 0  # missing/corrupt images skipped (counted, logged) before failing; 0 = fail at once
    assistant_only: bool = False  # chat: supervise assistant content + <|im_end|> only
    system_message: str = DEFAULT_SYSTEM_MESSAGE
    seed: int = 0
    shuffle: bool = True
    streaming: bool = False  # pretraining pairs through datasets' streaming (IterableDataset)
    image_column: str = "image"
    caption_column: str = "caption"
    # The dataset check (python -m data.check) run by the trainer before the model is built, on rank 0:
    # fast = records, tokens, tags, truncation, duplicates, images exist; full = + every image decoded.
    check: Literal["off", "fast", "full"] = "fast"
    check_max_error_fraction: float = 0.001  # the check fails when more records than this have an error


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
                return render_chatml(self.tokenizer, record["conversations"], self.num_image_tokens,
                                     self.config.system_message, self.config.assistant_only)
            return render_task(self.tokenizer, record, self.num_image_tokens)
        except (ValueError, KeyError) as e:
            raise DataFormatError(f"{where}: {e}") from e

    def build(self, record: dict, where: str) -> dict:
        full = self.tokenize(record, where)
        sample = truncate_span_safe(full, self.config.max_len, self.img_start, self.img_end)
        if sample is None:
            logger.warning("%s: dropped: %d tokens, nothing supervised fits in max_len=%d without cutting an image",
                           where, len(full), self.config.max_len)
            return {"dropped": stats.DROPPED_TOO_LONG}
        try:
            pixels = [load_image(p, self.config.image_size, where) for p in sample.image_paths]
        except ImageLoadError as e:
            if self.config.max_bad_images <= 0:
                raise
            logger.warning("skipping sample (max_bad_images=%d): %s", self.config.max_bad_images, e)
            return {"dropped": stats.DROPPED_BAD_IMAGE}
        s = self.config.image_size
        return {
            "input_ids": torch.tensor(sample.input_ids, dtype=torch.long),
            "labels": torch.tensor(sample.labels, dtype=torch.long),
            "pixel_values": torch.stack(pixels) if pixels else torch.zeros(0, 3, s, s),
            "truncated": len(sample) < len(full),
        }


class VLMDataset(Dataset):
    """Map-style dataset over JSON/JSONL/CSV/Parquet records, validated when loaded."""

    def __init__(self, config: DataConfig, tokenizer, num_image_tokens: int) -> None:
        self.records: list[dict] = []
        self.wheres: list[str] = []
        for path in config.paths:
            records, wheres = load_records(path, config.format, config.image_root)
            self.records += records
            self.wheres += wheres
        if not self.records:
            raise DataFormatError(f"no records in {config.paths}")
        self.builder = SampleBuilder(tokenizer, num_image_tokens, config)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.builder.build(self.records[index], self.wheres[index])

    def token_lengths(self) -> list[int]:
        """Token count of every sample (tokenises everything once: used for length grouping)."""
        return [min(len(self.builder.tokenize(r, w)), self.builder.config.max_len)
                for r, w in zip(self.records, self.wheres, strict=True)]


class StreamingVLMDataset(IterableDataset):
    """Pretraining pairs streamed with Hugging Face ``datasets``: split across ranks with
    ``split_dataset_by_node`` and across DataLoader workers by ``datasets`` itself (by file shard, so
    give it at least as many files as workers; extra workers idle, with a warning from ``datasets``)."""

    def __init__(self, config: DataConfig, tokenizer, num_image_tokens: int, rank: int, world_size: int) -> None:
        from datasets.distributed import split_dataset_by_node

        ds = load_pretrain_pairs(config.paths, streaming=True, image_column=config.image_column,
                                 caption_column=config.caption_column)
        if config.shuffle:
            ds = ds.shuffle(seed=config.seed, buffer_size=10_000)
        self.hf_dataset = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        self.base_dir = Path(config.image_root) if config.image_root else Path(config.paths[0]).parent
        self.source = ",".join(config.paths)
        self.builder = SampleBuilder(tokenizer, num_image_tokens, config)

    def set_epoch(self, epoch: int) -> None:
        self.hf_dataset.set_epoch(epoch)  # reshuffles shard order and buffer per epoch

    def __iter__(self) -> Iterator[dict]:
        for i, row in enumerate(self.hf_dataset):
            where = f"{self.source} streamed row {i} (this rank/worker)"
            try:
                record = normalize_record(dict(row), "pretrain", self.base_dir)
            except ValueError as e:
                raise DataFormatError(f"{where}: {e}") from e
            yield self.builder.build(record, where)


@dataclass
class ResumableLoader:
    """A DataLoader plus the bookkeeping the contract needs: it advances the sampler as batches reach
    the trainer (so ``state_dict`` is exact despite prefetching), strips the per-batch ``_stats``,
    enforces ``max_bad_images`` over the whole run, skips batches whose samples were all dropped and
    logs the drop counters at the end of each epoch."""

    dataloader: DataLoader
    batch_size: int
    max_bad_images: int
    sampler: ResumableSampler | None = None  # None when streaming
    stats: stats.DataStats = field(default_factory=stats.DataStats)
    epoch: int = 0
    batches_done: int = 0  # streaming only: batches delivered this epoch (resume fast-forwards over them)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.batches_done = 0
        self.epoch = epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        else:
            self.dataloader.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        """Batches left in this epoch (map-style only)."""
        if self.sampler is None:
            raise TypeError("a streaming loader has no length")
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        skip = 0 if self.sampler is not None else self.batches_done
        for batch in self.dataloader:
            if skip:  # streaming resume: replay the order up to where the checkpoint was taken
                skip -= 1
                continue
            counts = batch.pop("_stats")
            self.stats.add(counts)
            if self.stats.total[stats.DROPPED_BAD_IMAGE] > self.max_bad_images:
                raise ImageLoadError(f"{self.stats.total[stats.DROPPED_BAD_IMAGE]} bad images exceed "
                                     f"max_bad_images={self.max_bad_images} (see the warnings above for the files)")
            if self.sampler is not None:
                # every item the sampler gave (kept or dropped) is consumed
                self.sampler.advance(counts[stats.SAMPLES] + counts[stats.DROPPED_TOO_LONG]
                                     + counts[stats.DROPPED_BAD_IMAGE])
            else:
                self.batches_done += 1
            if batch["num_samples"] > 0:
                yield batch
        self.stats.end_epoch(self.epoch)
        self.set_epoch(self.epoch + 1)  # a checkpoint taken now resumes at the start of the next epoch

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "stats": self.stats.state_dict(), "batches_done": self.batches_done}
        if self.sampler is not None:
            state["sampler"] = self.sampler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.batches_done = state.get("batches_done", 0)
        self.stats.load_state_dict(state["stats"])
        if self.sampler is not None:
            self.sampler.load_state_dict(state["sampler"])
        else:
            self.dataloader.dataset.set_epoch(self.epoch)


def build_dataloader(config: DataConfig, tokenizer, num_image_tokens: int, batch_size: int,
                     rank: int = 0, world_size: int = 1) -> ResumableLoader:
    """The trainer's one entry point: a resumable loader of batch dicts (docs/design.md section 2).

    ``batch_size`` counts samples per micro-batch and rank; with packing they share fewer rows.
    """
    collator = Collator(pad_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT), image_size=config.image_size,
                        max_len=config.pack_len or config.max_len, packing=config.packing)
    common = {"batch_size": batch_size, "collate_fn": collator, "num_workers": config.num_workers,
              "persistent_workers": False, "pin_memory": torch.cuda.is_available()}
    if config.num_workers > 0:
        common["prefetch_factor"] = 2
    if config.streaming:
        dataset = StreamingVLMDataset(config, tokenizer, num_image_tokens, rank, world_size)
        return ResumableLoader(DataLoader(dataset, **common), batch_size, config.max_bad_images)
    dataset = VLMDataset(config, tokenizer, num_image_tokens)
    lengths = dataset.token_lengths() if config.group_by_length else None
    sampler = ResumableSampler(len(dataset), seed=config.seed, rank=rank, world_size=world_size,
                               shuffle=config.shuffle, lengths=lengths)
    return ResumableLoader(DataLoader(dataset, sampler=sampler, **common), batch_size,
                           config.max_bad_images, sampler=sampler)
