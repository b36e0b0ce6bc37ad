"""Records -> tokenised samples with pixels -> batches: the datasets and ``build_dataloader``.

Tokenisation happens lazily in ``__getitem__`` and image decoding therefore in DataLoader workers.
The trainer calls two functions: ``load_data`` when it starts (records validated, image files checked,
before any model is built) and ``build_dataloader``::

    records = load_data(config)            # DataConfig(paths=["train.json"], image_size=448, max_len=2048)
    loader = build_dataloader(config, tokenizer, num_image_tokens=256, batch_size=8, rank=r, world_size=w,
                              records=records)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader: ...           # the batch dict of docs/design.md section 2
        loader.stats.total                 # counters (also logged at the end of every epoch)
    ckpt["data"] = loader.state_dict()     # position inside the epoch; loader.load_state_dict(...) resumes
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from tqdm import tqdm

from data import stats
from data.chatml import DEFAULT_SYSTEM_MESSAGE, render_chatml, render_preference_pair
from data.collate import Collator
from data.formats import (
    DataFormatError,
    empty_answer_turn,
    is_preference,
    load_records,
    normalize_record,
    record_image_paths,
)
from data.images import ImageLoadError, load_image
from data.sample import TokenizedSample, truncate_pair, truncate_span_safe
from data.sampler import ResumableSampler
from data.shards import ShardReader, expand_shard_patterns, shard_kind
from data.streaming import ReaderStream, assign_shards
from data.templates import render_task
from data.text import token_id
from data.webdataset import (
    DEFAULT_CAPTION_KEY,
    DEFAULT_IMAGE_KEYS,
    BadSample,
    pair_of,
    parse_caption_key,
    parse_image_keys,
)
from models.errors import UserError
from models.tokens import ENDOFTEXT, IMG_END, IMG_START

logger = logging.getLogger(__name__)


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
    shuffle_buffer: int = 1000  # streaming: records each DataLoader worker mixes (held in memory; re-read on resume)
    image_column: str = "image"
    caption_column: str = "caption"
    wds_image_keys: str = DEFAULT_IMAGE_KEYS  # webdataset: image member extensions, the first present is used
    wds_caption_key: str = DEFAULT_CAPTION_KEY  # webdataset: caption member ("txt"), or "json:caption" for a JSON field

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

    def validate(self) -> None:
        """Raise ValueError naming the key when the section contradicts itself (the recipe loader adds the
        file; rules that involve other sections are the recipe's, train/recipe.py)."""
        if self.pack_len is not None:
            if not self.packing:
                raise ValueError("'data.pack_len' needs 'data.packing: true'")
            if self.pack_len < self.max_len:
                raise ValueError(f"'data.pack_len' ({self.pack_len}) must be >= 'data.max_len' ({self.max_len})")


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
        except ImageLoadError:
            raise  # a pixel box needed the image's size from its header: a bad image, not a bad record
        except (ValueError, KeyError, TypeError) as e:
            raise DataFormatError(f"{where}: {e}") from e

    def tokenize_pair(self, record: dict, where: str) -> tuple[TokenizedSample, TokenizedSample]:
        try:
            return render_preference_pair(self.tokenizer, record["conversations"], record["chosen"],
                                          record["rejected"], self.num_image_tokens, self.config.system_message)
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
                logger.warning("%s: dropped: %d tokens, nothing supervised fits in max_len=%d without cutting an "
                               "image", where, len(full), self.config.max_len)
                return {"dropped": stats.DROPPED_TOO_LONG}
            pixels = [load_image(p, self.config.image_size, where, data=(image_bytes or {}).get(p))
                      for p in sample.image_paths]
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
            chosen, rejected, truncated = truncate_pair(chosen, rejected, self.config.max_len, self.img_start,
                                                        self.img_end)
        except ValueError as e:
            raise DataFormatError(f"{where}: {e}") from e
        try:
            pixels = [load_image(p, self.config.image_size, where) for p in chosen.image_paths]
        except ImageLoadError as e:
            return bad_image_marker(e)
        s = self.config.image_size
        return {
            "chosen": {"input_ids": torch.tensor(chosen.input_ids), "labels": torch.tensor(chosen.labels)},
            "rejected": {"input_ids": torch.tensor(rejected.input_ids), "labels": torch.tensor(rejected.labels)},
            "pixel_values": torch.stack(pixels) if pixels else torch.zeros(0, 3, s, s),
            "truncated": truncated,
        }


def bad_image_marker(error: ImageLoadError) -> dict:
    """The drop marker of a sample whose image is missing or undecodable, with the file and the message."""
    return {"dropped": stats.DROPPED_BAD_IMAGE, "bad_image": (error.path or str(error), str(error))}


@dataclass
class Records:
    """The validated records of a map-style data config, minus those whose image files are missing."""

    records: list[dict]
    wheres: list[str]  # "FILE record i" / "FILE line n" of each record, for error messages
    missing_images: dict[str, str]  # missing file -> the first record that refers to it
    dropped: int = 0  # records removed because an image file is missing


def load_data(config: DataConfig, preference: bool = False) -> Records | None:
    """Read and validate every record, and check that every image file exists, before a model is built.
    ``preference``: every record must be a preference pair (DPO), else none may be.

    Missing files are summarised in one message (how many, a few paths, the records that use them). More
    distinct missing files than ``config.max_bad_images`` is a UserError; fewer are logged and the records
    that use them dropped (counted in data.stats). Streamed data (None returned) is checked as it is read.
    """
    if config.streaming:
        return None
    records: list[dict] = []
    wheres: list[str] = []
    for path in config.paths:
        file_records, file_wheres = load_records(path, config.format, config.image_root)
        records += file_records
        wheres += file_wheres
    if not records:
        raise DataFormatError(f"no records in {', '.join(config.paths) or 'data.paths (empty)'}")
    for record, where in zip(records, wheres, strict=True):
        if is_preference(record) != preference:
            raise DataFormatError(
                f"{where}: not a preference pair (no 'chosen'/'rejected'); train.stage: dpo needs pairs only"
                if preference else f"{where}: a preference pair (chosen/rejected); train it with train.stage: dpo")
    missing = _on_rank0(lambda: find_missing_images(records, wheres))
    if not missing:
        return Records(records, wheres, {})
    uses = [any(p in missing for p in record_image_paths(r)) for r in records]
    summary = (f"{len(missing)} image files are missing, used by {sum(uses)} of the {len(records)} records of "
               f"{', '.join(config.paths)}: " + "; ".join(f"{p} ({w})" for p, w in list(missing.items())[:5])
               + ("; ..." if len(missing) > 5 else ""))
    if len(missing) > config.max_bad_images:
        hint = " (relative paths resolve against data.image_root, else the data file's folder)"
        raise ImageLoadError(f"{summary}. That exceeds data.max_bad_images={config.max_bad_images}{hint}",
                             next(iter(missing)))
    kept = [i for i, bad in enumerate(uses) if not bad]
    if not kept:
        raise ImageLoadError(f"{summary}. No record is left", next(iter(missing)))
    logger.warning("%s. Those records are skipped (data.max_bad_images=%d)", summary, config.max_bad_images)
    return Records([records[i] for i in kept], [wheres[i] for i in kept], missing, dropped=len(records) - len(kept))


def find_missing_images(records: list[dict], wheres: list[str], threads: int = 32,
                        chunk: int = 512) -> dict[str, str]:
    """{missing image file: the first record that refers to it}. Each distinct file is checked once, by a
    thread pool (stat calls wait on the disk or a network file system, not on Python), with a progress
    bar when there are many."""
    first_use: dict[str, str] = {}
    for record, where in zip(records, wheres, strict=True):
        for path in record_image_paths(record):
            first_use.setdefault(path, where)
    paths = list(first_use)
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    missing: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(chunks)))) as pool:
        results = pool.map(lambda files: [p for p in files if not os.path.isfile(p)], chunks)
        if len(paths) >= 20_000:
            results = tqdm(results, total=len(chunks), unit="chunk", desc=f"checking {len(paths)} image files")
        for found in results:
            missing += found
    return {p: first_use[p] for p in missing}


def _on_rank0(compute):
    """``compute()`` on rank 0 only, its result sent to every rank (all ranks must drop the same records,
    and one rank checking spares a shared file system the same stat calls from every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return compute()
    box = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class VLMDataset(Dataset):
    """Map-style dataset over JSON/JSONL/CSV/Parquet records, validated when loaded (see ``load_data``)."""

    def __init__(self, config: DataConfig, tokenizer, num_image_tokens: int, preference: bool = False,
                 records: Records | None = None) -> None:
        self.data = records if records is not None else load_data(config, preference)
        self.records, self.wheres = self.data.records, self.data.wheres
        self.builder = SampleBuilder(tokenizer, num_image_tokens, config)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        item = self.builder.build(self.records[index], self.wheres[index])
        if "chosen" in item:
            item["index"] = index  # looks up precomputed reference log-probs (train.dpo)
        return item

    def token_lengths(self) -> list[int]:
        """Token count of every sample (of both sequences of a pair; tokenises everything once: used for
        length grouping)."""
        max_len = self.builder.config.max_len

        def length(record: dict, where: str) -> int:
            if is_preference(record):
                return sum(min(len(s), max_len) for s in self.builder.tokenize_pair(record, where))
            return min(len(self.builder.tokenize(record, where)), max_len)

        return [length(r, w) for r, w in zip(self.records, self.wheres, strict=True)]


class StreamingVLMDataset(IterableDataset):
    """Streamed pretraining pairs -> batches: JSONL/CSV/Parquet/JSON-list shards or WebDataset tars.

    Each DataLoader worker is one reader of data.streaming (its own shards, shuffle buffer and position)
    and yields whole batches, each carrying ``_position``: the worker's position after it. The loader
    keeps the position of the last batch it delivered from each worker; ``resume_at`` hands them back
    before the next ``iter()`` (workers are started per iteration and get a copy of this object).
    """

    def __init__(self, config: DataConfig, tokenizer, num_image_tokens: int, rank: int, world_size: int,
                 batch_size: int, collator: Collator) -> None:
        self.config, self.rank, self.batch_size, self.collator = config, rank, batch_size, collator
        self.urls = expand_shard_patterns(config.paths)
        kinds = sorted({shard_kind(u) for u in self.urls})
        if len(kinds) > 1:
            raise UserError(f"data.paths: streamed shards must all be of one kind, got {', '.join(kinds)}")
        self.webdataset = config.format == "webdataset"
        if self.webdataset != (kinds[0] == "tar"):
            raise UserError(f"data.format: webdataset reads .tar shards, not {self.urls[0]}" if self.webdataset else
                            f"data.paths: {self.urls[0]} is a tar shard: set data.format: webdataset")
        if not self.webdataset and config.format not in ("pretrain", "auto"):
            raise UserError(f"data.streaming reads pretraining pairs; data.format={config.format!r} is not streamed")
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
            logger.warning("%d shards for %d readers (%d ranks x %d workers): readers share shards, each reading "
                           "all of its shard and keeping every k-th record; give >= %d shards to read each once",
                           len(self.urls), self.num_readers, world_size, self.num_workers, self.num_readers)
        elif rank == 0 and len(self.urls) % self.num_readers:
            logger.warning("%d shards for %d readers (%d ranks x %d workers): some read one shard more, so ranks' "
                           "epochs differ in length; give a multiple of %d", len(self.urls), self.num_readers,
                           world_size, self.num_workers, self.num_readers)

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
        assignments = assign_shards(len(self.urls), self.num_readers, reader, cfg.seed, self.epoch, cfg.shuffle)
        saved = self.positions.get(worker)
        stream = ReaderStream(self.urls, self.reader, assignments, cfg.shuffle_buffer if cfg.shuffle else 1,
                              seed=(cfg.seed, self.epoch, reader), state=saved["stream"] if saved else None)
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
            record, where, image = streamed_pair(raw, url, index, self.config, self.image_keys, self.caption_key)
        except BadSample as e:  # counted like a bad image file: the sample is the unit
            return {"dropped": stats.DROPPED_BAD_SAMPLE, "bad_image": (e.where, str(e))}
        if image is not None:
            return self.builder.build(record, where, image_bytes={record["image"]: image})
        try:
            record = normalize_record(record, "pretrain", self.base_dir)
        except ValueError as e:
            raise DataFormatError(f"{where}: {e}") from e
        return self.builder.build(record, where)


def streamed_pair(raw: dict, url: str, index: int, config: DataConfig, image_keys: list[str],
                  caption_key: tuple[str, str | None]) -> tuple[dict, str, bytes | None]:
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
                raise DataFormatError(f"{where}: pretraining data needs a {column!r} column; found {sorted(raw)}")
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
    stats: stats.DataStats = field(default_factory=stats.DataStats)
    epoch: int = 0
    positions: dict[int, dict] = field(default_factory=dict)  # streaming: worker -> position after its last batch
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
                raise ImageLoadError(f"{message}; {n} distinct bad image files exceed data.max_bad_images="
                                     f"{self.max_bad_images}", path)
            logger.warning("%s; the samples that use it are skipped (%d of data.max_bad_images=%d bad files)",
                           message, n, self.max_bad_images)

    def state_dict(self) -> dict:
        """Plain lists, dicts and numbers (a JSON or ``torch.load(weights_only=True)`` round trip keeps it)."""
        state = {"epoch": self.epoch, "stats": self.stats.state_dict()}
        if self.sampler is not None:
            state["sampler"] = self.sampler.state_dict()
        else:
            dataset = self.dataloader.dataset
            state["stream"] = {
                "num_workers": dataset.num_workers, "num_readers": dataset.num_readers,
                "shards": len(dataset.urls), "shards_digest": dataset.shards_digest, "next_worker": self.next_worker,
                "positions": [_plain(self.positions[w]) if w in self.positions else None
                              for w in range(dataset.num_workers)],
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
            logger.warning("the checkpoint has no streaming position: epoch %d restarts from its beginning", self.epoch)
            self.positions, self.next_worker = {}, 0
            return
        now = {"num_workers": dataset.num_workers, "num_readers": dataset.num_readers, "shards": len(dataset.urls),
               "shards_digest": dataset.shards_digest}
        changed = [k for k in now if saved[k] != now[k]]
        if changed:
            raise UserError(f"the checkpoint's data position was saved with {', '.join(f'{k}={saved[k]}' for k in changed)}, "
                            f"now {', '.join(f'{k}={now[k]}' for k in changed)}: resume with the same data.paths, "
                            "data.num_workers and number of ranks (readers = ranks x workers), or start a new run")
        self.positions = {w: p for w, p in enumerate(saved["positions"]) if p is not None}
        self.next_worker = saved["next_worker"]


def _plain(value):
    """numpy arrays (a position's buffer references) -> lists, recursively."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def build_dataloader(config: DataConfig, tokenizer, num_image_tokens: int, batch_size: int,
                     rank: int = 0, world_size: int = 1, preference: bool = False,
                     records: Records | None = None) -> ResumableLoader:
    """The trainer's one entry point: a resumable loader of batch dicts (docs/design.md section 2).

    ``batch_size`` counts samples (preference pairs when ``preference``) per micro-batch and rank; with
    packing they share fewer rows. ``records``: what ``load_data(config, preference)`` returned (loaded
    here when not given).
    """
    if preference and config.streaming:
        raise DataFormatError("preference pairs are read map-style; set data.streaming: false")
    collator = Collator(pad_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT), image_size=config.image_size,
                        row_len=config.row_len, packing=config.packing)
    common = {"num_workers": config.num_workers, "persistent_workers": False, "pin_memory": torch.cuda.is_available()}
    if config.num_workers > 0:
        common["prefetch_factor"] = 2
    if config.streaming:
        dataset = StreamingVLMDataset(config, tokenizer, num_image_tokens, rank, world_size, batch_size, collator)
        return ResumableLoader(DataLoader(dataset, batch_size=None, collate_fn=_as_is, **common), batch_size,
                               config.max_bad_images)
    dataset = VLMDataset(config, tokenizer, num_image_tokens, preference, records)
    lengths = dataset.token_lengths() if config.group_by_length else None
    sampler = ResumableSampler(len(dataset), seed=config.seed, rank=rank, world_size=world_size,
                               shuffle=config.shuffle, lengths=lengths)
    loader = ResumableLoader(DataLoader(dataset, sampler=sampler, batch_size=batch_size, collate_fn=collator,
                                        **common), batch_size, config.max_bad_images, sampler=sampler)
    loader.stats.start_with_missing_images(dataset.data.missing_images, dataset.data.dropped)
    return loader
