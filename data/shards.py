"""One shard of streamed training data, read from any position: what makes a resume O(1).

A shard is one file, local or any fsspec URL: a WebDataset ``.tar``, JSON lines, CSV, Parquet, or a JSON
list. A reader yields ``(raw, start, end)`` for each record from a given position on, where
``[start, end)`` locates the record inside the shard and ``end`` is where reading goes on after it:

| kind | raw record | start / end |
|---|---|---|
| tar | ``{"__key__": key, ext: bytes, ...}``: the members sharing a key | byte offsets (below) |
| jsonl, csv | the parsed line(s) as a dict | byte offsets of the line(s) |
| parquet, json | the row / list item as a dict | row indices |

A tar record's members are those sharing a key (WebDataset's grouping); its start and end are the byte
offsets of the first member's header and past the last member's data.

``read(position)`` seeks there and reads on (a Parquet reader reads from the start of the row group that
holds the row); ``read_ranges`` reads only the given records (the shuffle buffer of a resumed worker), with
one concurrent ``cat_ranges`` call on remote file systems. Nothing before a saved position is read again.

Why not webdataset's or datasets' iterators: both stream a shard from its first byte and neither reports
where a record sits, so a resume would replay the shard. Tar members are read by the standard library's
``tarfile`` (it reports each member's offset) and grouped into samples by webdataset's key convention
(``webdataset.tariterators.base_plus_ext``); the shards are written by ``webdataset.TarWriter``.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import PurePosixPath

import fsspec
import pyarrow.parquet as pq
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from models.errors import UserError

KINDS = {".tar": "tar", ".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: __key__-style members carry no data

Record = tuple[dict, int, int]  # (raw record, start, end)


def expand_shard_patterns(patterns: list[str]) -> list[str]:
    """Brace patterns (``/data/laion/{00000..01023}.tar``; several joined by ``::``) -> shard URLs, in order.
    Local shards must exist (remote ones are checked when opened)."""
    urls = [url for pattern in patterns for url in expand_urls(pattern)]
    if not urls:
        raise UserError("data.paths: no shards given")
    missing = [u for u in urls if "://" not in u and not fsspec.core.url_to_fs(u)[0].exists(u)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(
            f"data.paths: {len(missing)} of {len(urls)} shards not found: {', '.join(missing[:3])}{more}"
        )
    return urls


def shard_kind(url: str) -> str:
    suffix = PurePosixPath(url.split("?")[0]).suffix.lower()
    if suffix not in KINDS:
        raise UserError(
            f"data.paths: {url}: streamed shards must be {'/'.join(KINDS)} (uncompressed .tar: a "
            "compressed archive cannot be entered at a saved offset)"
        )
    return KINDS[suffix]


class ShardReader:
    """Reads the records of one kind of shard."""

    def __init__(self, kind: str) -> None:
        if kind not in KINDS.values():
            raise ValueError(f"unknown shard kind {kind!r}")
        self.kind = kind

    def read(self, url: str, position: int = 0) -> Iterator[Record]:
        """Records of the shard from ``position`` (a start or end this reader reported) to its end."""
        return getattr(self, f"_read_{self.kind}")(url, position)

    def read_ranges(self, url: str, ranges: list[tuple[int, int]]) -> list[dict]:
        """The records at the given (start, end) ranges, in that order, reading nothing else."""
        if not ranges:
            return []
        if self.kind in ("parquet", "json"):
            rows = self._rows(url, sorted({start for start, _ in ranges}))
            records = [rows[start] for start, _ in ranges]
        else:
            fs, path = fsspec.core.url_to_fs(url)
            if fs.async_impl:  # remote: the ranges are fetched concurrently
                blobs = fs.cat_ranges([path] * len(ranges), [s for s, _ in ranges], [e for _, e in ranges])
            else:  # local: one open file, not one per range
                with fs.open(path, "rb") as f:
                    blobs = [_read_at(f, s, e) for s, e in ranges]
            header = self._csv_header(url)[0] if self.kind == "csv" else None
            records = [self._parse_blob(url, blob, start, header) for blob, (start, _) in zip(blobs, ranges)]
        return records

    # ------------------------------------------------------------------------------------ tar
    def _read_tar(self, url: str, position: int) -> Iterator[Record]:
        with fsspec.open(url, "rb") as f:
            f.seek(position)
            if not f.read(1):  # at the end of an archive without end-of-archive blocks
                return
            f.seek(position)
            yield from _tar_samples(f, url, base=position)

    # ---------------------------------------------------------------------------------- jsonl
    def _read_jsonl(self, url: str, position: int) -> Iterator[Record]:
        with fsspec.open(url, "rb") as f:
            f.seek(position)
            yield from _lines(f, url, position)

    # ------------------------------------------------------------------------------------ csv
    def _csv_header(self, url: str) -> tuple[list[str], int]:
        with fsspec.open(url, "rb") as f:
            line = f.readline()
        try:
            return next(csv.reader([line.decode("utf-8")])), len(line)
        except (StopIteration, UnicodeDecodeError) as e:
            raise UserError(f"{url}: no readable CSV header line") from e

    def _read_csv(self, url: str, position: int) -> Iterator[Record]:
        header, header_end = self._csv_header(url)
        with fsspec.open(url, "rb") as f:
            position = max(position, header_end)
            f.seek(position)
            reader = _TrackedLines(f, position)
            start = position
            # csv.reader pulls a line only when the current row needs it (several for quoted newlines),
            # so after each row the tracked offset is exactly where the next one begins.
            for row in csv.reader(reader):
                yield _csv_row(url, header, row, start), start, reader.offset
                start = reader.offset

    # ------------------------------------------------------------------- parquet / json list
    def _read_parquet(self, url: str, position: int) -> Iterator[Record]:
        with fsspec.open(url, "rb") as f:
            pf = pq.ParquetFile(f)
            first = 0
            for group in range(pf.num_row_groups):
                n = pf.metadata.row_group(group).num_rows
                if first + n > position:
                    rows = pf.read_row_group(group).to_pylist()
                    for i in range(max(position, first), first + n):
                        yield rows[i - first], i, i + 1
                first += n

    def _read_json(self, url: str, position: int) -> Iterator[Record]:
        items = _json_list(url)
        for i in range(position, len(items)):
            yield items[i], i, i + 1

    def _rows(self, url: str, wanted: list[int]) -> dict[int, dict]:
        """Rows by index, reading each Parquet row group that holds one once (a JSON list whole)."""
        if self.kind == "json":
            items = _json_list(url)
            return {i: items[i] for i in wanted}
        out: dict[int, dict] = {}
        with fsspec.open(url, "rb") as f:
            pf = pq.ParquetFile(f)
            first = 0
            for group in range(pf.num_row_groups):
                n = pf.metadata.row_group(group).num_rows
                inside = [i for i in wanted if first <= i < first + n]
                if inside:
                    rows = pf.read_row_group(group).to_pylist()
                    out.update({i: rows[i - first] for i in inside})
                first += n
        return out

    def _parse_blob(self, url: str, blob: bytes, start: int, header: list[str] | None) -> dict:
        if self.kind == "tar":
            samples = list(_tar_samples(io.BytesIO(blob), url, base=start))
            if len(samples) != 1:
                raise UserError(
                    f"{url}: bytes {start}-{start + len(blob)} no longer hold one sample "
                    "(was the shard rewritten since the checkpoint?)"
                )
            return samples[0][0]
        if self.kind == "jsonl":
            return _parse_json_line(url, blob, start)
        return _csv_row(url, header, next(csv.reader(io.StringIO(blob.decode("utf-8")))), start)


# ------------------------------------------------------------------------------------ helpers
def _tar_samples(f, url: str, base: int) -> Iterator[Record]:
    """WebDataset samples of the tar stream ``f``, which starts at byte ``base`` of the shard: consecutive
    members with the same key (the name up to the first dot of its last path part) form one sample."""
    sample: dict | None = None
    start = end = base
    try:
        with tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                header = base + member.offset
                name = member.name
                if not member.isreg() or _META.match(name):
                    continue
                key, ext = base_plus_ext(name)
                if key is None:
                    continue
                if sample is not None and key != sample["__key__"]:
                    yield sample, start, end
                    sample = None
                if sample is None:
                    sample, start = {"__key__": key}, header
                ext = ext.lower()
                if ext in sample:
                    raise UserError(f"{url}: sample {key!r} has two {ext!r} members (byte {header})")
                sample[ext] = tar.extractfile(member).read()
                end = base + member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    except tarfile.TarError as e:
        raise UserError(f"{url}: unreadable tar after byte {end}: {e}") from e
    if sample is not None:
        yield sample, start, end


def _read_at(f, start: int, end: int) -> bytes:
    f.seek(start)
    return f.read(end - start)


class _TrackedLines:
    """Lines of a binary file as text, counting the bytes handed out (the csv module reads through it)."""

    def __init__(self, f, offset: int) -> None:
        self.f, self.offset = f, offset

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        line = self.f.readline()
        if not line:
            raise StopIteration
        self.offset += len(line)
        return line.decode("utf-8")


def _lines(f, url: str, position: int) -> Iterator[Record]:
    for line in iter(f.readline, b""):
        start, position = position, position + len(line)
        if line.strip():
            yield _parse_json_line(url, line, start), start, position


def _parse_json_line(url: str, line: bytes, start: int) -> dict:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{url}: malformed JSON line at byte {start}: {e}") from e
    if not isinstance(record, dict):
        raise UserError(f"{url}: the line at byte {start} is not a JSON object")
    return record


def _csv_row(url: str, header: list[str], row: list[str], start: int) -> dict:
    if len(row) != len(header):
        raise UserError(f"{url}: the CSV row at byte {start} has {len(row)} fields, the header {len(header)}")
    return dict(zip(header, row, strict=True))


def _json_list(url: str) -> list:
    with fsspec.open(url, "rb") as f:
        try:
            items = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{url}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(items, list):
        raise UserError(f"{url}: expected a JSON list of records, got {type(items).__name__}")
    return items
