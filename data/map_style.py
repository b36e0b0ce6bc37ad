"""Map-style data: every record read and validated, and every image file checked, before a model is built
(``load_data``); then ``VLMDataset[i]`` builds sample i in a DataLoader worker."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.config import DataConfig
from data.formats import (
    DataFormatError,
    is_preference,
    load_records,
    record_image_paths,
)
from data.image_files import ImageLoadError
from data.sample_builder import FamilySampleBuilder, SampleBuilder

logger = logging.getLogger(__name__)

LENGTHS_PROGRESS_FROM = 20_000  # records: below this the lengths take seconds, no progress bar
LENGTHS_CHUNK = 256  # records a worker counts at a time


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
                if preference
                else f"{where}: a preference pair (chosen/rejected); train it with train.stage: dpo"
            )
    missing = _on_rank0(lambda: find_missing_images(records, wheres))
    if not missing:
        return Records(records, wheres, {})
    uses = [any(p in missing for p in record_image_paths(r)) for r in records]
    summary = (
        f"{len(missing)} image files are missing, used by {sum(uses)} of the {len(records)} records of "
        f"{', '.join(config.paths)}: "
        + "; ".join(f"{p} ({w})" for p, w in list(missing.items())[:5])
        + ("; ..." if len(missing) > 5 else "")
    )
    if len(missing) > config.max_bad_images:
        hint = " (relative paths resolve against data.image_root, else the data file's folder)"
        raise ImageLoadError(
            f"{summary}. That exceeds data.max_bad_images={config.max_bad_images}{hint}", next(iter(missing))
        )
    kept = [i for i, bad in enumerate(uses) if not bad]
    if not kept:
        raise ImageLoadError(f"{summary}. No record is left", next(iter(missing)))
    logger.warning("%s. Those records are skipped (data.max_bad_images=%d)", summary, config.max_bad_images)
    return Records(
        [records[i] for i in kept], [wheres[i] for i in kept], missing, dropped=len(records) - len(kept)
    )


def find_missing_images(
    records: list[dict], wheres: list[str], threads: int = 32, chunk: int = 512
) -> dict[str, str]:
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
            results = tqdm(
                results, total=len(chunks), unit="chunk", desc=f"checking {len(paths)} image files"
            )
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

    def __init__(
        self,
        config: DataConfig,
        tokenizer,
        num_image_tokens: int,
        preference: bool = False,
        records: Records | None = None,
        builder: SampleBuilder | FamilySampleBuilder | None = None,
    ) -> None:
        """``builder``: how a record becomes a sample; default the Qwen-VL model's (``tokenizer`` and
        ``num_image_tokens``), a FamilySampleBuilder for a Hugging Face family."""
        self.data = records if records is not None else load_data(config, preference)
        self.records, self.wheres = self.data.records, self.data.wheres
        self.builder = builder or SampleBuilder(tokenizer, num_image_tokens, config)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        item = self.builder.build(self.records[index], self.wheres[index])
        if "chosen" in item:
            item["index"] = index  # looks up precomputed reference log-probs (train.dpo)
        return item

    def token_lengths(self, num_workers: int = 0) -> list[int]:
        """Token count of every sample (of both sequences of a pair), for length grouping and batches bounded
        by tokens. Tokenises everything once, reading each image's size from its header where images take
        their own token counts (a family renders its chat template per turn: about 1.3 ms a record on one
        core), in ``num_workers`` DataLoader worker processes (the training loader's, data.num_workers), with
        a progress bar from LENGTHS_PROGRESS_FROM records. A record whose image cannot be read counts 0:
        building it skips it, counted as a bad image."""
        chunks = [range(i, min(i + LENGTHS_CHUNK, len(self))) for i in range(0, len(self), LENGTHS_CHUNK)]
        loader = DataLoader(
            _Lengths(self), batch_size=None, sampler=chunks, num_workers=num_workers if len(chunks) > 1 else 0
        )
        bar = tqdm(
            total=len(self),
            desc="sample lengths",
            unit="rec",
            mininterval=2.0,
            disable=len(self) < LENGTHS_PROGRESS_FROM,
        )
        lengths: list[int] = []
        for chunk in loader:  # in order: the DataLoader returns its workers' results in sampler order
            lengths += chunk
            bar.update(len(chunk))
        bar.close()
        return lengths

    def token_length(self, index: int) -> int:
        """Sample ``index``'s token count (see token_lengths)."""
        max_len = self.builder.config.max_len
        record, where = self.records[index], self.wheres[index]
        try:
            if is_preference(record):
                return sum(min(len(s), max_len) for s in self.builder.tokenize_pair(record, where))
            return min(len(self.builder.tokenize(record, where)), max_len)
        except ImageLoadError:
            return 0


class _Lengths(Dataset):
    """A VLMDataset seen as the token counts of chunks of its samples (VLMDataset.token_lengths)."""

    def __init__(self, dataset: VLMDataset) -> None:
        self.dataset = dataset

    def __getitem__(self, chunk: range) -> list[int]:
        return [self.dataset.token_length(i) for i in chunk]
