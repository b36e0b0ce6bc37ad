"""Streamed data (data.shards, data.streaming, the streaming loader): every rank x worker reads its own
shards, the shuffle is a function of (seed, epoch), and a resume is O(1) and exact: a resumed run yields
the uninterrupted run's sequence and reads none of the samples it had already consumed.

Ranks are simulated in one process (a loader per rank, as tests/test_data_sampler.py does); workers are
real DataLoader worker processes."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.dataset import DataConfig, build_dataloader
from data.shards import ShardReader, expand_shard_patterns
from data.streaming import ReaderStream, assign_shards
from data.webdataset import write_shards
from models.errors import UserError

N_IMG = 2


def png_bytes(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i * 5 % 256, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def make_tar_shards(root: Path, n_shards: int, per_shard: int) -> str:
    """Shards of samples KEY.png + KEY.txt, caption "n{i}" for sample i; returns their brace pattern."""
    samples = (
        {"__key__": f"{i:04d}", "png": png_bytes(i), "txt": f"n{i}".encode()}
        for i in range(n_shards * per_shard)
    )
    write_shards(samples, root, "s", per_shard)
    return str(root / f"s-{{000000..{n_shards - 1:06d}}}.tar")


def make_jsonl_shards(root: Path, n_files: int, per_file: int) -> list[str]:
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(n_files):
        lines = []
        for i in range(f * per_file, (f + 1) * per_file):
            (root / "imgs" / f"{i}.png").write_bytes(png_bytes(i))
            lines.append(json.dumps({"image": f"imgs/{i}.png", "caption": f"n{i}"}))
        path = root / f"part{f}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        paths.append(str(path))
    return paths


def caption_ids(batch, tok) -> list[int]:
    return [int(m) for row in batch["input_ids"] for m in re.findall(r"English: n(\d+)", tok.decode(row))]


# --------------------------------------------------------------------------- shard assignment
def test_each_epoch_deals_disjoint_shards_to_every_reader_in_an_order_drawn_from_seed_and_epoch():
    readers = [assign_shards(10, 4, r, seed=3, epoch=0) for r in range(4)]
    shards = [a.shard for r in readers for a in r]
    assert sorted(shards) == list(range(10))  # each shard once
    assert [len(r) for r in readers] == [3, 3, 2, 2]
    assert readers == [assign_shards(10, 4, r, seed=3, epoch=0) for r in range(4)]
    assert [a.shard for r in range(4) for a in assign_shards(10, 4, r, seed=3, epoch=1)] != shards
    assert [a.shard for a in assign_shards(10, 1, 0, seed=3, epoch=0, shuffle=False)] == list(range(10))


def test_fewer_shards_than_readers_share_each_shard_split_by_record():
    readers = [assign_shards(2, 6, r, seed=0, epoch=0) for r in range(6)]
    assert all(len(r) == 1 for r in readers)
    by_shard: dict[int, list[tuple[int, int]]] = {}
    for r in readers:
        by_shard.setdefault(r[0].shard, []).append((r[0].every, r[0].which))
    # 3 readers per shard, each keeping one residue class of the records: together all of them, once
    assert {s: sorted(v) for s, v in by_shard.items()} == {
        0: [(3, 0), (3, 1), (3, 2)],
        1: [(3, 0), (3, 1), (3, 2)],
    }


# --------------------------------------------------------------------- readers and positions
@pytest.fixture(params=["tar", "jsonl", "csv", "parquet", "json"])
def one_shard(request, tmp_path) -> tuple[ShardReader, str, list[str]]:
    """One shard of 7 records of every kind; returns (reader, url, captions in file order)."""
    captions = [f"caption {i}" + (', with "quotes"\nand a newline' if i == 3 else "") for i in range(7)]
    rows = [{"image": f"{i}.png", "caption": c} for i, c in enumerate(captions)]
    kind = request.param
    if kind == "tar":
        write_shards(
            ({"__key__": f"{i:03d}", "png": png_bytes(i), "txt": c.encode()} for i, c in enumerate(captions)),
            tmp_path,
            "t",
            100,
        )
        return ShardReader("tar"), str(tmp_path / "t-000000.tar"), captions
    path = tmp_path / f"shard.{kind}"
    if kind == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # a trailing blank line is skipped
    elif kind == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["image", "caption"])
            w.writeheader()
            w.writerows(rows)
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)  # 3 row groups
    else:
        path.write_text(json.dumps(rows))
    return ShardReader(kind), str(path), captions


def caption_of(raw: dict) -> str:
    return raw["txt"].decode() if "txt" in raw else raw["caption"]


def test_a_shard_read_from_any_saved_position_goes_on_with_the_next_record(one_shard):
    reader, url, captions = one_shard
    records = list(reader.read(url))
    assert [caption_of(r) for r, _, _ in records] == captions
    for k, (_, _, end) in enumerate(records):
        assert [caption_of(r) for r, _, _ in reader.read(url, end)] == captions[k + 1 :]
    # and any record is read alone from its range
    ranges = [(s, e) for _, s, e in records][::-2]
    assert [caption_of(r) for r in reader.read_ranges(url, ranges)] == captions[::-2]


def test_stream_state_taken_after_any_record_resumes_the_exact_sequence(tmp_path):
    pattern = make_tar_shards(tmp_path, n_shards=3, per_shard=5)
    urls = expand_shard_patterns([pattern])
    reader = ShardReader("tar")

    def stream(state=None):
        return ReaderStream(
            urls, reader, assign_shards(3, 1, 0, seed=1, epoch=0), buffer_size=4, seed=(1, 0, 0), state=state
        )

    full = [raw["__key__"] for raw, _, _ in stream()]
    assert sorted(full) == [f"{i:04d}" for i in range(15)] and full != sorted(full)  # shuffled, complete
    for k in range(len(full) + 1):
        s = stream()
        it = iter(s)
        head = [next(it)[0]["__key__"] for _ in range(k)]
        state = json.loads(json.dumps({**s.state_dict(), "buffer": s.state_dict()["buffer"].tolist()}))
        assert head + [raw["__key__"] for raw, _, _ in stream(state)] == full


def test_shard_patterns_expand_and_missing_local_shards_are_named(tmp_path):
    pattern = make_tar_shards(tmp_path, n_shards=3, per_shard=1)
    assert [Path(u).name for u in expand_shard_patterns([pattern])] == [f"s-00000{i}.tar" for i in range(3)]
    with pytest.raises(UserError, match=r"1 of 4 shards not found: .*s-000003\.tar"):
        expand_shard_patterns([pattern.replace("000002", "000003")])


# ---------------------------------------------------- the loader: 2 ranks x 2 workers, resumed
BATCH, BUFFER = 3, 5


@pytest.fixture(scope="module")
def stream_sources(tmp_path_factory) -> dict[str, tuple[list[str], str]]:
    """webdataset: 8 shards (2 per reader); jsonl: 2 files for 4 readers (shared shards, split by record)."""
    root = tmp_path_factory.mktemp("streams")
    return {
        "webdataset": ([make_tar_shards(root / "wds", n_shards=8, per_shard=6)], "webdataset"),
        "jsonl": (make_jsonl_shards(root / "jsonl", n_files=2, per_file=23), "pretrain"),
    }


def make_loader(source, tok, rank: int):
    paths, fmt = source
    cfg = DataConfig(
        paths=paths,
        format=fmt,
        streaming=True,
        image_size=8,
        max_len=64,
        num_workers=2,
        seed=7,
        shuffle_buffer=BUFFER,
    )
    return build_dataloader(cfg, tok, num_image_tokens=N_IMG, batch_size=BATCH, rank=rank, world_size=2)


class ReadLog:
    """Records the id of every record any ShardReader reads, in this process or a forked DataLoader worker
    (each appends a line to a file: workers inherit the patched class)."""

    def __init__(self, monkeypatch, path: Path) -> None:
        self.path = path
        read, read_ranges = ShardReader.read, ShardReader.read_ranges
        log = self.log

        def logged_read(reader, url, position=0):
            for record in read(reader, url, position):
                log([record[0]])
                yield record

        def logged_read_ranges(reader, url, ranges):
            records = read_ranges(reader, url, ranges)
            log(records)
            return records

        monkeypatch.setattr(ShardReader, "read", logged_read)
        monkeypatch.setattr(ShardReader, "read_ranges", logged_read_ranges)

    def log(self, raws: list[dict]) -> None:
        with open(self.path, "a") as f:
            f.write("".join(f"{int(raw.get('__key__') or raw['caption'][1:])}\n" for raw in raws))

    def take(self) -> list[int]:
        """The ids read since the last take."""
        ids = [int(x) for x in self.path.read_text().split()] if self.path.exists() else []
        self.path.write_text("")
        return ids


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["webdataset", "jsonl"])
def test_resumed_streams_yield_the_uninterrupted_sequence_and_reread_nothing_consumed(
    kind, stream_sources, tiny_tokenizer, tmp_path, monkeypatch
):
    tok, source = tiny_tokenizer, stream_sources[kind]
    reads = ReadLog(monkeypatch, tmp_path / "reads.log")
    expected, whole = {}, set()
    for rank in (0, 1):
        loader = make_loader(source, tok, rank)
        expected[rank] = [[i for b in loader for i in caption_ids(b, tok)] for _epoch in (0, 1)]
        assert reads.take(), "the read log must see the workers' reads"
        whole |= set(expected[rank][0])
        assert len(set(expected[rank][0])) == len(expected[rank][0])  # no sample twice in an epoch
    assert set(expected[0][0]).isdisjoint(expected[1][0]) and whole == set(
        range(46 if kind == "jsonl" else 48)
    )
    assert expected[0][0] != expected[0][1]  # reshuffled per epoch

    for rank in (0, 1):
        n_batches = -(-len(expected[rank][0]) // BATCH)
        for stop in (1, 2, n_batches // 2, n_batches - 1):
            loader = make_loader(source, tok, rank)
            before = []
            for k, batch in enumerate(loader):
                before += caption_ids(batch, tok)
                if k + 1 == stop:
                    break  # the workers have prefetched (and shuffled, decoded) beyond this point
            state = json.loads(json.dumps(loader.state_dict()))  # survives a checkpoint round trip
            reads.take()
            resumed = make_loader(source, tok, rank)
            resumed.load_state_dict(state)
            after = [i for b in resumed for i in caption_ids(b, tok)]
            assert before + after == expected[rank][0], (rank, stop)
            read_after = reads.take()
            assert not set(read_after) & set(before), "a resumed run read a sample it had consumed"
            if kind == "webdataset":  # readers own their shards: each remaining sample is read exactly once
                assert sorted(read_after) == sorted(after)
            # the epoch ended, so the loader moved on to epoch 1 by itself
            assert [i for b in resumed for i in caption_ids(b, tok)] == expected[rank][1]


def test_resume_refuses_a_different_number_of_readers(stream_sources, tiny_tokenizer):
    paths, fmt = stream_sources["webdataset"]
    loader = make_loader(stream_sources["webdataset"], tiny_tokenizer, 0)
    cfg = DataConfig(paths=paths, format=fmt, image_size=8, max_len=64, num_workers=1)
    other = build_dataloader(
        cfg, tiny_tokenizer, num_image_tokens=N_IMG, batch_size=BATCH, rank=0, world_size=2
    )
    with pytest.raises(UserError, match="num_workers=2.*now num_workers=1"):
        other.load_state_dict(loader.state_dict())


def test_buffer_references_are_small_numbers_not_sample_bytes(stream_sources, tiny_tokenizer):
    loader = make_loader(stream_sources["webdataset"], tiny_tokenizer, 0)
    next(iter(loader))
    (position,) = [p for p in loader.state_dict()["stream"]["positions"] if p is not None]
    buffer = np.asarray(position["stream"]["buffer"])
    assert buffer.shape == (BUFFER - 1, 4)  # (shard, start, end, index) per buffered sample
