"""Streamed data (pretraining pairs in shards: JSONL/CSV/Parquet/JSON lists or WebDataset tars): each
DataLoader worker is one reader of data.streaming and yields whole batches with its position."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

from torch.utils.data import IterableDataset, get_worker_info

from data import stats
from data.collate import Collator
from data.config import DataConfig
from data.formats import (
    DataFormatError,
    normalize_record,
)
from data.sample_builder import SampleBuilder
from data.shards import ShardReader, expand_shard_patterns, shard_kind
from data.streaming import ReaderStream, assign_shards
from data.webdataset import (
    BadSample,
    pair_of,
    parse_caption_key,
    parse_image_keys,
)
from models.errors import UserError

logger = logging.getLogger(__name__)


class StreamingVLMDataset(IterableDataset):
    """Streamed pretraining pairs -> batches: JSONL/CSV/Parquet/JSON-list shards or WebDataset tars.

    Each DataLoader worker is one reader of data.streaming (its own shards, shuffle buffer and position)
    and yields whole batches, each carrying ``_position``: the worker's position after it. The loader
    keeps the position of the last batch it delivered from each worker; ``resume_at`` hands them back
    before the next ``iter()`` (workers are started per iteration and get a copy of this object).
    """

    def __init__(
        self,
        config: DataConfig,
        tokenizer,
        num_image_tokens: int,
        rank: int,
        world_size: int,
        batch_size: int,
        collator: Collator,
    ) -> None:
        self.config, self.rank, self.batch_size, self.collator = config, rank, batch_size, collator
        self.urls = expand_shard_patterns(config.paths)
        kinds = sorted({shard_kind(u) for u in self.urls})
        if len(kinds) > 1:
            raise UserError(f"data.paths: streamed shards must all be of one kind, got {', '.join(kinds)}")
        self.webdataset = config.format == "webdataset"
        if self.webdataset != (kinds[0] == "tar"):
            raise UserError(
                f"data.format: webdataset reads .tar shards, not {self.urls[0]}"
                if self.webdataset
                else f"data.paths: {self.urls[0]} is a tar shard: set data.format: webdataset"
            )
        if not self.webdataset and config.format not in ("pretrain", "auto"):
            raise UserError(
                f"data.streaming reads pretraining pairs; data.format={config.format!r} is not streamed"
            )
        self.reader = ShardReader(kinds[0])
        self.image_keys = parse_image_keys(config.wds_image_keys)
        self.caption_key = parse_caption_key(config.wds_caption_key)
        self.num_workers = max(config.num_workers, 1)
        self.num_readers = world_size * self.num_workers
        self.shards_digest = hashlib.sha1("\n".join(self.urls).encode()).hexdigest()
        self.base_dir = Path(config.image_root) if config.image_root else Path(self.urls[0]).parent
        self.builder = SampleBuilder(tokenizer, num_image_tokens, config)
        self.epoch, self.first_worker = 0, 0
        self.positions: dict[int, dict] = {}
        if rank == 0 and len(self.urls) < self.num_readers:
            logger.warning(
                "%d shards for %d readers (%d ranks x %d workers): readers share shards, each reading "
                "all of its shard and keeping every k-th record; give >= %d shards to read each once",
                len(self.urls),
                self.num_readers,
                world_size,
                self.num_workers,
                self.num_readers,
            )
        elif rank == 0 and len(self.urls) % self.num_readers:
            logger.warning(
                "%d shards for %d readers (%d ranks x %d workers): some read one shard more, so ranks' "
                "epochs differ in length; give a multiple of %d",
                len(self.urls),
                self.num_readers,
                world_size,
                self.num_workers,
                self.num_readers,
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, positions: dict[int, dict], first_worker: int) -> None:
        """Before ``iter()``: worker w restarts from ``positions[w]`` (absent: the epoch's start); DataLoader
        worker 0 plays worker ``first_worker``, so batches keep coming in the uninterrupted run's order."""
        self.epoch, self.positions, self.first_worker = epoch, positions, first_worker

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.first_worker) % self.num_workers
        reader = self.rank * self.num_workers + worker
        cfg = self.config
        assignments = assign_shards(
            len(self.urls), self.num_readers, reader, cfg.seed, self.epoch, cfg.shuffle
        )
        saved = self.positions.get(worker)
        stream = ReaderStream(
            self.urls,
            self.reader,
            assignments,
            cfg.shuffle_buffer if cfg.shuffle else 1,
            seed=(cfg.seed, self.epoch, reader),
            state=saved["stream"] if saved else None,
        )
        items = []
        for raw, url, index in stream:
            items.append(self._sample(raw, url, index))
            if len(items) == self.batch_size:
                yield self._batch(items, worker, stream)
                items = []
        if items:
            yield self._batch(items, worker, stream)

    def _batch(self, items: list[dict], worker: int, stream: ReaderStream) -> dict:
        batch = self.collator(items)
        batch["_position"] = {"worker": worker, "epoch": self.epoch, "stream": stream.state_dict()}
        return batch

    def _sample(self, raw: dict, url: str, index: int) -> dict:
        try:
            record, where, image = streamed_pair(
                raw, url, index, self.config, self.image_keys, self.caption_key
            )
        except BadSample as e:  # counted like a bad image file: the sample is the unit
            return {"dropped": stats.DROPPED_BAD_SAMPLE, "bad_image": (e.where, str(e))}
        if image is not None:
            return self.builder.build(record, where, image_bytes={record["image"]: image})
        try:
            record = normalize_record(record, "pretrain", self.base_dir)
        except ValueError as e:
            raise DataFormatError(f"{where}: {e}") from e
        return self.builder.build(record, where)


def streamed_pair(
    raw: dict,
    url: str,
    index: int,
    config: DataConfig,
    image_keys: list[str],
    caption_key: tuple[str, str | None],
) -> tuple[dict, str, bytes | None]:
    """A streamed shard's raw record as the pretraining pair ``{image, caption}``, where it is (for
    messages), and, for a WebDataset sample, the image's bytes (its ``image`` names the shard member; a
    JSONL/CSV/Parquet row's names a file, not yet resolved: ``normalize_record`` does that). Training and
    ``python -m data.check`` both read streamed records through this.

    DataFormatError: a row without the configured columns. BadSample (``.where`` set): a WebDataset
    sample without a usable image or caption member."""
    where = f"{url} record {index}"
    if config.format != "webdataset":
        record = {k: v for k, v in raw.items() if k not in (config.image_column, config.caption_column)}
        for column, name in ((config.image_column, "image"), (config.caption_column, "caption")):
            if column not in raw:
                raise DataFormatError(
                    f"{where}: pretraining data needs a {column!r} column; found {sorted(raw)}"
                )
            record[name] = raw[column]
        return record, where, None
    where = f"{where} (key {raw['__key__']!r})"
    try:
        record, image = pair_of(raw, url, image_keys, caption_key)
    except BadSample as e:
        error = BadSample(f"{where}: {e}")
        error.where = where
        raise error from e
    return record, where, image
