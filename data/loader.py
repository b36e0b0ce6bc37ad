"""``build_dataloader``: the trainer's resumable loader of batch dicts, over map-style or streamed data."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from data import stats
from data.collate import Collator
from data.config import DataConfig
from data.formats import (
    DataFormatError,
)
from data.image_files import ImageLoadError
from data.map_style import Records, VLMDataset
from data.sample_builder import FamilySampleBuilder, SampleBuilder
from data.sampler import ResumableSampler, TokenBatchSampler
from data.streamed_dataset import StreamingVLMDataset
from models.errors import UserError

logger = logging.getLogger(__name__)


def _as_is(batch: dict) -> dict:
    """The DataLoader's collate_fn for streaming: workers already yield whole batches."""
    return batch


@dataclass
class ResumableLoader:
    """A DataLoader plus the bookkeeping the contract needs: it records the position of the data as
    batches reach the trainer (so ``state_dict`` is exact despite prefetching), strips the per-batch
    ``_stats`` and ``_bad_images``, enforces ``max_bad_images`` over the whole run, skips batches whose
    samples were all dropped and logs the drop counters at the end of each epoch.

    max_bad_images counts distinct files: a worker reports every sample it skipped with its file, and only
    the main process, which sees every worker's batches, knows whether the file was seen before.

    Map-style data: the sampler's count of consumed samples. Streamed data: each worker's position after
    the last batch delivered from it, and which worker delivers next (the DataLoader takes batches from
    its workers in turn, skipping those that are done, so that fixes the order of the rest)."""

    dataloader: DataLoader
    batch_size: int
    max_bad_images: int
    sampler: ResumableSampler | None = None  # None when streaming
    batch_sampler: TokenBatchSampler | None = None  # batches bounded by tokens (train.micro_batch_tokens)
    stats: stats.DataStats = field(default_factory=stats.DataStats)
    epoch: int = 0
    positions: dict[int, dict] = field(
        default_factory=dict
    )  # streaming: worker -> position after its last batch
    next_worker: int = 0  # streaming: the worker whose batch comes next

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.positions, self.next_worker = {}, 0
        self.epoch = epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        """Batches left in this epoch (map-style only)."""
        if self.sampler is None:
            raise TypeError("a streaming loader has no length")
        if self.batch_sampler is not None:
            return len(self.batch_sampler)
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        streamed = self.sampler is None
        if streamed:
            self.dataloader.dataset.resume_at(self.epoch, dict(self.positions), self.next_worker)
        for batch in self.dataloader:
            counts = batch.pop("_stats")
            self.stats.add(counts)
            self.count_bad_images(batch.pop("_bad_images", ()))
            if streamed:
                position = batch.pop("_position")
                self.positions[position["worker"]] = position
                self.next_worker = (position["worker"] + 1) % self.dataloader.dataset.num_workers
            else:
                # every item the sampler gave (kept or dropped) is consumed
                self.sampler.advance(counts[stats.SAMPLES] + sum(counts[k] for k in stats.SAMPLER_DROPS))
            if batch["num_samples"] > 0:
                yield batch
        self.stats.end_epoch(self.epoch)
        self.set_epoch(self.epoch + 1)  # a checkpoint taken now resumes at the start of the next epoch

    def count_bad_images(self, bad_images) -> None:
        """A batch's ``_bad_images`` (file, message): samples skipped for a bad image. A file not seen before
        counts against max_bad_images (also called by passes that read the dataset outside this loader)."""
        for path, message in bad_images:
            if not self.stats.add_bad_image(path, message):
                continue  # already counted (an earlier epoch, another record, another worker)
            n = len(self.stats.bad_images)
            if n > self.max_bad_images:
                raise ImageLoadError(
                    f"{message}; {n} distinct bad image files exceed data.max_bad_images="
                    f"{self.max_bad_images}",
                    path,
                )
            logger.warning(
                "%s; the samples that use it are skipped (%d of data.max_bad_images=%d bad files)",
                message,
                n,
                self.max_bad_images,
            )

    def state_dict(self) -> dict:
        """Plain lists, dicts and numbers (a JSON or ``torch.load(weights_only=True)``
        round trip keeps it)."""
        state = {"epoch": self.epoch, "stats": self.stats.state_dict()}
        if self.sampler is not None:
            state["sampler"] = self.sampler.state_dict()
        else:
            dataset = self.dataloader.dataset
            state["stream"] = {
                "num_workers": dataset.num_workers,
                "num_readers": dataset.num_readers,
                "shards": len(dataset.urls),
                "shards_digest": dataset.shards_digest,
                "next_worker": self.next_worker,
                "positions": [
                    _plain(self.positions[w]) if w in self.positions else None
                    for w in range(dataset.num_workers)
                ],
            }
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.stats.load_state_dict(state["stats"])
        if self.sampler is not None:
            self.sampler.load_state_dict(state["sampler"])
            return
        dataset = self.dataloader.dataset
        saved = state.get("stream")
        if saved is None:  # a checkpoint from before O(1) resume kept only a batch count
            logger.warning(
                "the checkpoint has no streaming position: epoch %d restarts from its beginning", self.epoch
            )
            self.positions, self.next_worker = {}, 0
            return
        now = {
            "num_workers": dataset.num_workers,
            "num_readers": dataset.num_readers,
            "shards": len(dataset.urls),
            "shards_digest": dataset.shards_digest,
        }
        changed = [k for k in now if saved[k] != now[k]]
        if changed:
            raise UserError(
                "the checkpoint's data position was saved with "
                f"{', '.join(f'{k}={saved[k]}' for k in changed)}, "
                f"now {', '.join(f'{k}={now[k]}' for k in changed)}: resume with the same data.paths, "
                "data.num_workers and number of ranks (readers = ranks x workers), or start a new run"
            )
        self.positions = {w: p for w, p in enumerate(saved["positions"]) if p is not None}
        self.next_worker = saved["next_worker"]


def _plain(value):
    """numpy arrays (a position's buffer references) -> lists, recursively."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def build_dataloader(
    config: DataConfig,
    tokenizer=None,
    num_image_tokens: int | None = None,
    batch_size: int = 1,
    rank: int = 0,
    world_size: int = 1,
    preference: bool = False,
    records: Records | None = None,
    builder: SampleBuilder | FamilySampleBuilder | None = None,
    batch_tokens: int | None = None,
) -> ResumableLoader:
    """The trainer's one entry point: a resumable loader of batch dicts (docs/design.md section 2).

    ``batch_size`` counts samples (preference pairs when ``preference``) per micro-batch and rank; with
    packing they share fewer rows. ``batch_tokens`` (packing, map-style): a micro-batch also stops before
    its tokens would exceed this, ``batch_size`` then being a cap on its samples (data.sampler.token_batches;
    every sample is tokenised once at start-up to know its length). ``records``: what
    ``load_data(config, preference)`` returned (loaded here when not given). ``builder``: how a record
    becomes a sample (data.sample_builder; default the Qwen-VL model's, from ``tokenizer`` and
    ``num_image_tokens``); a Hugging Face family's is read map-style only.
    """
    builder = builder or SampleBuilder(tokenizer, num_image_tokens, config)
    if preference and config.streaming:
        raise DataFormatError("preference pairs are read map-style; set data.streaming: false")
    if not isinstance(builder, SampleBuilder) and config.streaming:
        raise DataFormatError("a Hugging Face family reads its data map-style; set data.streaming: false")
    if batch_tokens is not None:
        try:
            config.check_token_batches()
        except ValueError as e:
            raise UserError(str(e)) from None
    collator = Collator(
        pad_id=builder.pad_id,
        image_size=config.image_size,
        row_len=config.row_len,
        packing=config.packing,
        mrope=getattr(builder, "mrope", None),
    )
    common = {
        "num_workers": config.num_workers,
        "persistent_workers": False,
        "pin_memory": torch.cuda.is_available(),
    }
    if config.num_workers > 0:
        common["prefetch_factor"] = 2
    if config.streaming:
        dataset = StreamingVLMDataset(
            config, builder.tokenizer, builder.num_image_tokens, rank, world_size, batch_size, collator
        )
        return ResumableLoader(
            DataLoader(dataset, batch_size=None, collate_fn=_as_is, **common),
            batch_size,
            config.max_bad_images,
        )
    dataset = VLMDataset(config, tokenizer, num_image_tokens, preference, records, builder)
    if config.group_by_length or batch_tokens is not None:
        lengths = dataset.token_lengths(config.num_workers)
    else:
        lengths = None
    sampler = ResumableSampler(
        len(dataset),
        seed=config.seed,
        rank=rank,
        world_size=world_size,
        shuffle=config.shuffle,
        lengths=lengths if config.group_by_length else None,
    )
    if batch_tokens is None:
        batch_sampler = None
        batching = {"sampler": sampler, "batch_size": batch_size}
    else:
        batch_sampler = TokenBatchSampler(sampler, lengths, max_tokens=batch_tokens, max_samples=batch_size)
        batching = {"batch_sampler": batch_sampler}
    loader = ResumableLoader(
        DataLoader(dataset, collate_fn=collator, **batching, **common),
        batch_size,
        config.max_bad_images,
        sampler=sampler,
        batch_sampler=batch_sampler,
    )
    loader.stats.start_with_missing_images(dataset.data.missing_images, dataset.data.dropped)
    return loader
