"""``check_data``: run the dataset check on a DataConfig and return its report.

Text part (data.check.scan) in worker processes, chunk by chunk, results added up here in file
order; then duplicates (by the identity of each sample's tokens and images); then the image part
(data.check.images) on the distinct paths. The report (data.check.report) says what would hurt a run.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from data.check.images import check_images
from data.check.report import CheckReport, build_report
from data.check.scan import ChunkResult, init_scan, read_chunks, scan_chunk
from data.dataset import DataConfig
from data.sample_builder import FamilySampleBuilder
from models.errors import UserError

MODES = ("fast", "full")
SMALL_INPUT_BYTES = 16 << 20  # below this, worker processes cost more to start than they save


@dataclass
class CheckOptions:
    mode: str = (
        "fast"  # fast: records, tokens, tags, truncation, duplicates, images exist; full: + images decode
    )
    max_error_fraction: float = 0.001  # fail when more records than this have an error
    workers: int | None = (
        None  # processes for the text part; None: one per core (at most 8), 1 for small input
    )
    image_threads: int = 16
    image_sample: int | None = None  # check only this many distinct images, drawn at random
    limit: int | None = None  # read only the first N records
    micro_batch: int = 1  # samples per micro-batch, for the padding estimate
    micro_batch_tokens: int | None = (
        None  # the trainer's token bound on a micro-batch (train.micro_batch_tokens)
    )
    progress: bool = True
    max_examples: int = 5  # examples listed per problem kind


@dataclass
class Totals:
    """ChunkResults added up, plus the index of distinct images and of sample identities."""

    records: int = 0
    error_records: int = 0
    formats: Counter = field(default_factory=Counter)
    tasks: Counter = field(default_factory=Counter)
    problems: Counter = field(default_factory=Counter)
    examples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    full_len: array = field(default_factory=lambda: array("i"))
    kept_len: array = field(default_factory=lambda: array("i"))
    supervised: array = field(default_factory=lambda: array("i"))
    images_per_sample: Counter = field(default_factory=Counter)
    image_ids: dict[str, int] = field(default_factory=dict)  # distinct path -> id
    image_first_use: list[str] = field(default_factory=list)  # id -> where it is first referenced
    sample_images: array = field(default_factory=lambda: array("i"))  # image ids, sample after sample
    sample_image_end: array = field(default_factory=lambda: array("q"))  # end offset per sample
    first_seen: dict[bytes, str] = field(default_factory=dict)  # sample identity -> where first seen

    def add(self, r: ChunkResult, max_examples: int) -> None:
        self.records += r.records
        self.error_records += r.error_records
        self.formats.update(r.formats)
        self.tasks.update(r.tasks)
        for kind, examples in r.examples.items():
            self.add_problem(kind, 0, examples, max_examples)
        self.problems.update(r.problems)
        self.full_len.extend(r.full_len)
        self.kept_len.extend(r.kept_len)
        self.supervised.extend(r.supervised)
        for where, paths, digest in zip(r.wheres, r.images, r.digests, strict=True):
            self.images_per_sample[len(paths)] += 1
            for path in paths:
                image = self.image_ids.get(path)
                if image is None:
                    image = self.image_ids[path] = len(self.image_ids)
                    self.image_first_use.append(where)
                self.sample_images.append(image)
            self.sample_image_end.append(len(self.sample_images))
            first = self.first_seen.get(digest)
            if first is None:
                self.first_seen[digest] = where
            else:
                self.add_problem(
                    "duplicate", 1, [(where, f"same tokens and images as {first}")], max_examples
                )

    def add_problem(self, kind: str, count: int, examples: list[tuple[str, str]], max_examples: int) -> None:
        self.problems[kind] += count
        kept = self.examples.setdefault(kind, [])
        kept += examples[: max_examples - len(kept)]


def check_data(
    config: DataConfig,
    tokenizer,
    num_image_tokens: int | None,
    options: CheckOptions,
    builder: FamilySampleBuilder | None = None,
) -> CheckReport:
    """Read ``config``'s data as training would and report its problems (see data/check/__init__.py).
    ``builder``: a Hugging Face family's sample builder (``num_image_tokens`` None: each image takes its
    own grid's tokens, read from its header); default the Qwen-VL model's (``tokenizer``,
    ``num_image_tokens``)."""
    if options.mode not in MODES:
        raise UserError(f"data check mode {options.mode!r}: expected one of {', '.join(MODES)}")
    if not config.paths:
        raise UserError("data.paths is empty: no data to check")
    for path in config.paths:
        if not config.streaming and not Path(path).exists():
            raise UserError(f"data file not found: {path}")
    workers = options.workers or _default_workers(config)
    totals = Totals()
    malformed: list[tuple[str, ...]] = []
    start = time.perf_counter()
    with tqdm(desc="data.check records", unit="rec", disable=not options.progress, mininterval=1.0) as bar:
        chunks = read_chunks(config, malformed, options.limit, decode=options.mode == "full")
        init_args = (tokenizer, num_image_tokens, config, options.max_examples, builder)
        for result in _map_in_order(scan_chunk, chunks, workers, init_scan, init_args):
            totals.add(result, options.max_examples)
            bar.update(result.records)
    for (
        where,
        message,
        *kind,
    ) in malformed:  # malformed JSON lines, unusable shard samples: training refuses them
        totals.records += 1
        totals.error_records += 1
        totals.add_problem(kind[0] if kind else "invalid_record", 1, [(where, message)], options.max_examples)
    text_seconds = time.perf_counter() - start
    if totals.records == 0:
        raise UserError(f"no records in {', '.join(config.paths)}")

    start = time.perf_counter()
    # A WebDataset sample's image is a member of its shard: read (and, in full mode, decoded) with the record.
    paths = [] if config.format == "webdataset" else list(totals.image_ids)
    if options.image_sample is not None and options.image_sample < len(paths):
        paths = random.Random(0).sample(paths, options.image_sample)
    bad_images = check_images(
        paths,
        decode=options.mode == "full",
        threads=options.image_threads,
        progress=options.progress,
        image_size=config.image_size,
    )
    image_seconds = time.perf_counter() - start
    _count_image_problems(totals, bad_images, options.max_examples)
    return build_report(
        totals,
        config,
        options,
        num_image_tokens,
        images_checked=len(paths),
        bad_image_samples=_samples_with_bad_images(totals, bad_images),
        seconds={"text": text_seconds, "images": image_seconds},
        workers=workers,
    )


def _default_workers(config: DataConfig) -> int:
    if not config.streaming and sum(os.path.getsize(p) for p in config.paths) < SMALL_INPUT_BYTES:
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


def _map_in_order(
    fn: Callable, items: Iterable, workers: int, initializer: Callable, init_args: tuple
) -> Iterator:
    """``map(fn, items)`` in ``workers`` processes, in order, with a bounded number of items in flight
    (Pool.imap would read the whole input ahead of the workers)."""
    if workers <= 1:
        initializer(*init_args)
        yield from map(fn, items)
        return
    # spawn, not fork: the parent may hold CUDA state (the trainer) or a tokenizer's thread pool
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=initializer, initargs=init_args
    ) as pool:
        in_flight: deque = deque()
        for item in items:
            in_flight.append(pool.submit(fn, item))
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


def _count_image_problems(totals: Totals, bad_images: dict[str, tuple[str, str]], max_examples: int) -> None:
    for path, (kind, message) in bad_images.items():
        where = totals.image_first_use[totals.image_ids[path]]
        totals.add_problem(kind, 1, [(where, message)], max_examples)


def _samples_with_bad_images(totals: Totals, bad_images: dict[str, tuple[str, str]]) -> int:
    """Samples that reference at least one bad image (training skips each, within max_bad_images)."""
    if not bad_images:
        return 0
    bad_ids = {totals.image_ids[p] for p in bad_images}
    count, start = 0, 0
    for end in totals.sample_image_end:
        if any(totals.sample_images[i] in bad_ids for i in range(start, end)):
            count += 1
        start = end
    return count
