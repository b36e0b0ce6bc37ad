"""The text part of the dataset check: records -> validated, tokenised samples -> facts and problems.

Records go through the training code itself (data.formats.normalize_record, then
data.dataset.SampleBuilder.tokenize: ChatML or task templates; then data.sample.truncate_span_safe
at max_len), so lengths, labels and drops are the ones training would see. Only the tokenizer is
stood in for (``PieceCache``: the Rust encoder called directly, each distinct piece once). Chunks
run in worker processes (``scan_chunk``); each returns a ``ChunkResult`` the caller adds up.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data.check.problems import PROBLEMS, classify, record_kind, text_problems
from data.dataset import DataConfig, SampleBuilder, streamed_pair
from data.formats import DataFormatError, detect_format, empty_answer_turn, iter_raw_records, normalize_record
from data.image_files import ImageLoadError, decode_image
from data.sample import TokenizedSample, span_safe_cut, truncate_span_safe
from data.sample_builder import FamilySampleBuilder
from data.shards import ShardReader, expand_shard_patterns, shard_kind
from data.webdataset import BadSample, parse_caption_key, parse_image_keys

CHUNK_RECORDS = 1000  # records per work item: amortises the inter-process traffic, small enough to stream


class PieceCache:
    """A tokenizer stand-in for data.chatml / data.templates: each distinct text piece they ask for is
    encoded once by the fast tokenizer's Rust backend and memoised.

    HF's ``tokenizer(text)`` spends ~70 us of Python around the Rust encode of one short piece, and the
    pieces of a chat repeat (roles, "\n", the system message, prompts). Batching the encodes instead
    (one ``encode_batch`` per chunk, which needs a second rendering pass to use its ids) measured no
    faster when every core already runs a worker (docs/data.md). The ids are those of training
    (tests/test_data_check.py compares every sample).
    """

    def __init__(self, tokenizer, max_pieces: int = 200_000) -> None:
        self.tokenizer = tokenizer
        self.max_pieces = max_pieces  # bounds memory: the cache restarts when full
        self.cache: dict[str, list[int]] = {}
        backend = getattr(tokenizer, "backend_tokenizer", None)  # the Rust tokenizer of a fast tokenizer
        if backend is not None:
            self._encode = lambda text: backend.encode(text, add_special_tokens=False).ids
        else:
            self._encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        if add_special_tokens:
            raise ValueError("PieceCache serves add_special_tokens=False calls only (as data.text makes)")
        ids = self.cache.get(text)
        if ids is None:
            if len(self.cache) >= self.max_pieces:
                self.cache.clear()
            ids = self.cache[text] = self._encode(text)
        return {"input_ids": list(ids)}  # a copy: callers own the list they get, as from a tokenizer

    def __getattr__(self, name: str):  # convert_tokens_to_ids, unk_token_id, ...: the real tokenizer's
        return getattr(self.tokenizer, name)


@dataclass
class Chunk:
    """Raw records of one data file, read in that file's format, images resolved against base_dir."""

    fmt: str
    base_dir: Path
    items: list[tuple[str, object]]  # (where, raw record)


@dataclass
class ChunkResult:
    """What one chunk contributes to the report. Per-sample lists are aligned (one entry per sample)."""

    records: int = 0
    error_records: int = 0  # records with at least one error (image files are checked later: run.py)
    formats: Counter = field(default_factory=Counter)
    tasks: Counter = field(default_factory=Counter)
    problems: Counter = field(default_factory=Counter)  # kind -> records with it
    examples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # kind -> [(where, message)]
    wheres: list[str] = field(default_factory=list)
    full_len: array = field(default_factory=lambda: array("i"))  # tokens before truncation
    kept_len: array = field(default_factory=lambda: array("i"))  # tokens training uses (0: dropped)
    supervised: array = field(default_factory=lambda: array("i"))  # supervised tokens training uses
    images: list[list[str]] = field(default_factory=list)  # image paths of each sample
    digests: list[bytes] = field(default_factory=list)  # identity of tokens + images (duplicates)

    def note(self, kinds: dict[str, str], where: str, max_examples: int) -> None:
        """Count one record's problems (kind -> first message) and keep the first few examples."""
        for kind, message in kinds.items():
            self.problems[kind] += 1
            examples = self.examples.setdefault(kind, [])
            if len(examples) < max_examples:
                examples.append((where, message))
        if any(PROBLEMS[k].error for k in kinds):
            self.error_records += 1


@dataclass
class ScanContext:
    """Per-process state of a scan: the tokenizer stand-in and the trainer's sample builder over it."""

    config: DataConfig
    builder: SampleBuilder | FamilySampleBuilder
    max_examples: int


_context: ScanContext | None = None  # set in each worker process by init_scan


def init_scan(
    tokenizer,
    num_image_tokens: int | None,
    config: DataConfig,
    max_examples: int,
    builder: FamilySampleBuilder | None = None,
) -> None:
    """Worker initialiser (also called in-process when the scan runs without workers). ``builder``: a Hugging
    Face family's (each image its own grid's tokens, from its header); default the Qwen-VL model's over the
    tokenizer's memoised pieces."""
    global _context
    builder = builder or SampleBuilder(PieceCache(tokenizer), num_image_tokens, config)
    _context = ScanContext(config, builder, max_examples)


def scan_chunk(chunk: Chunk) -> ChunkResult:
    """Validate, tokenise and measure one chunk of records (needs init_scan in this process)."""
    ctx = _context
    assert ctx is not None, "init_scan() first"
    result = ChunkResult()
    for where, raw in chunk.items:
        result.records += 1
        problems: dict[str, str] = {}
        try:
            if chunk.fmt == "webdataset":  # streamed_pair's {image, caption}; the image is a shard member
                result.formats[chunk.fmt] += 1
                record = raw
            else:
                result.formats[detect_format(raw, chunk.fmt) if isinstance(raw, dict) else chunk.fmt] += 1
                record = normalize_record(raw, chunk.fmt, chunk.base_dir)
            kind = record_kind(record)
            result.tasks[kind.task(record)] += 1
            for text, is_prompt in kind.texts(record):
                for problem, message in text_problems(text, is_prompt):
                    problems.setdefault(problem, message)
            empty_turn = empty_answer_turn(record)
            if empty_turn is not None:
                problems.setdefault("empty_answer", f"turn {empty_turn}: the assistant answer is empty")
            for sample in kind.samples(ctx.builder, record, where):
                measure_sample(sample, ctx, where, problems, result)
                if empty_turn is not None:  # training skips it (data.dataset SampleBuilder.build)
                    result.kept_len[-1] = result.supervised[-1] = 0
        except (ValueError, KeyError, TypeError, ImageLoadError) as e:
            problems.setdefault(classify(e), str(e))
        result.note(problems, where, ctx.max_examples)
    return result


def measure_sample(
    sample: TokenizedSample, ctx: ScanContext, where: str, problems: dict[str, str], result: ChunkResult
) -> None:
    """What training does with one sample at max_len: its lengths, supervised tokens, truncation."""
    max_len, img_start, img_end = ctx.config.max_len, ctx.builder.img_start, ctx.builder.img_end
    n, supervised = len(sample), sample.num_supervised
    if supervised == 0:
        problems.setdefault("no_supervised_tokens", f"{n} tokens, none supervised")
    kept_len, kept_supervised = n, supervised
    if n > max_len:
        cut, kept_images = span_safe_cut(sample.input_ids, max_len, img_start, img_end)
        problems.setdefault("truncated", f"{n} tokens > max_len={max_len}; cut at {cut}")
        if cut < max_len:
            problems.setdefault(
                "image_span_cut",
                f"max_len={max_len} falls inside image "
                f"{kept_images + 1} of {len(sample.image_paths)}; it and the rest are dropped",
            )
        kept = truncate_span_safe(sample, max_len, img_start, img_end)
        if kept is None:
            kept_len = kept_supervised = 0
            if supervised:
                problems.setdefault("dropped_too_long", f"{n} tokens; nothing supervised before token {cut}")
        else:
            kept_len, kept_supervised = len(kept), kept.num_supervised
    result.wheres.append(where)
    result.full_len.append(n)
    result.kept_len.append(kept_len)
    result.supervised.append(kept_supervised)
    result.images.append(sample.image_paths)
    identity = array("i", sample.input_ids).tobytes() + "\0".join(sample.image_paths).encode()
    result.digests.append(hashlib.blake2b(identity, digest_size=12).digest())


def read_chunks(
    config: DataConfig,
    malformed: list[tuple[str, ...]],
    limit: int | None = None,
    chunk_records: int = CHUNK_RECORDS,
    decode: bool = False,
) -> Iterator[Chunk]:
    """The records training reads, in file order, in chunks. Malformed JSON lines and unusable WebDataset
    samples are appended to ``malformed`` as (where, message[, problem kind]) instead of stopping the
    check; the caller counts them. ``decode``: decode the images stored inside shards (full mode)."""
    budget = limit if limit is not None else float("inf")
    for fmt, base_dir, items in _sources(config, malformed, decode):
        chunk: list[tuple[str, object]] = []
        for item in items:
            if budget <= 0:
                break
            chunk.append(item)
            budget -= 1
            if len(chunk) == chunk_records:
                yield Chunk(fmt, base_dir, chunk)
                chunk = []
        if chunk:
            yield Chunk(fmt, base_dir, chunk)
        if budget <= 0:
            return


def _sources(
    config: DataConfig, malformed: list[tuple[str, ...]], decode: bool = False
) -> Iterator[tuple[str, Path, Iterator]]:
    """(format, image base folder, (where, raw record) iterator) per source, as data.dataset reads them."""
    if config.streaming:  # StreamingVLMDataset: shard by shard, through the trainer's streamed_pair
        urls = expand_shard_patterns(config.paths)
        base_dir = Path(config.image_root) if config.image_root else Path(urls[0]).parent
        fmt = "webdataset" if config.format == "webdataset" else "pretrain"
        yield fmt, base_dir, _streamed_pairs(config, urls, malformed, decode)
        return
    for path in config.paths:  # VLMDataset: data.formats.load_records per file
        base_dir = Path(config.image_root) if config.image_root else Path(path).parent
        yield config.format, base_dir, iter_raw_records(path, config.format, malformed)


def _streamed_pairs(
    config: DataConfig, urls: list[str], malformed: list[tuple[str, ...]], decode: bool
) -> Iterator[tuple[str, dict]]:
    """Every shard's records in shard order (the check reads them all; training shuffles). A WebDataset
    sample's image is a member of its shard, not a file: a sample without a usable member is malformed;
    ``decode`` (full mode) decodes each image here, while its bytes are at hand."""
    keys, caption_key = parse_image_keys(config.wds_image_keys), parse_caption_key(config.wds_caption_key)
    reader = ShardReader(shard_kind(urls[0]))
    for url in urls:
        for index, (raw, _, _) in enumerate(reader.read(url)):
            try:
                record, where, image = streamed_pair(raw, url, index, config, keys, caption_key)
            except BadSample as e:
                malformed.append((e.where, str(e)))
                continue
            except DataFormatError as e:
                malformed.append((f"{url} record {index}", str(e)))
                continue
            if image is not None and decode:
                try:
                    decode_image(record["image"], where, data=image, size=config.image_size)
                except ImageLoadError as e:
                    malformed.append((where, str(e), "undecodable_image"))
                    continue
            yield where, record
