"""Streamed records: which shards each reader (rank x DataLoader worker) reads, the shuffle, and the
position a reader saves so that a resumed run goes on exactly where it stopped, in O(1).

- **Shards per reader** (``assign_shards``): each epoch the shard list is permuted by
  ``numpy.random.default_rng([seed, epoch])`` and dealt round-robin to the ``ranks x workers`` readers
  (reader ``rank * workers + worker``), so the readers of an epoch read disjoint shards. With fewer shards
  than readers, each shard is shared by the readers ``r`` with ``r % num_shards`` equal: each of them
  reads the whole shard and keeps every k-th record (k = readers sharing it; reading is cheap next to
  decoding, which stays split).
- **Shuffle** (``ReaderStream``): records of the reader's shards, in order, go through a buffer of
  ``buffer_size`` records; once it is full, each new record makes one leave, picked by a generator seeded
  with ``[seed, epoch, reader]``. Shard order + buffer mix within and across shards.
- **Position** (``ReaderStream.state_dict``): the shard being read, the offset in it after the last record
  read (data.shards), the records of the shard seen so far, the buffered records as references
  ``(shard, start, end, index)`` (not their bytes) and the generator's state. A resumed reader re-reads
  its buffer by reference (``buffer_size`` records at most, whatever the position) and reads on from the
  offset: nothing it had delivered is read again, and it yields what the uninterrupted reader would have.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from data.shards import ShardReader


@dataclass(frozen=True)
class Assignment:
    """One shard of a reader's epoch: it keeps the records ``i`` with ``i % every == which``."""

    shard: int  # index into the expanded shard list
    every: int = 1
    which: int = 0


def assign_shards(
    num_shards: int, num_readers: int, reader: int, seed: int, epoch: int, shuffle: bool = True
) -> list[Assignment]:
    """The shards ``reader`` (of ``num_readers``) reads in ``epoch``, in reading order."""
    if not 0 <= reader < num_readers:
        raise ValueError(f"reader {reader} outside {num_readers} readers")
    order = np.random.default_rng([seed, epoch]).permutation(num_shards) if shuffle else np.arange(num_shards)
    if num_shards >= num_readers:
        return [Assignment(int(s)) for s in order[reader::num_readers]]
    first = reader % num_shards  # fewer shards than readers: share them, split by record
    sharing = len(range(first, num_readers, num_shards))
    return [Assignment(int(order[first]), every=sharing, which=reader // num_shards)]


class ReaderStream:
    """The raw records one reader yields in one epoch, as ``(raw, shard url, record index in the shard)``;
    resumable from ``state_dict()`` taken between two records (the dataset takes it after each batch)."""

    def __init__(
        self,
        urls: list[str],
        reader: ShardReader,
        assignments: list[Assignment],
        buffer_size: int,
        seed: tuple[int, ...],
        state: dict | None = None,
    ) -> None:
        self.urls, self.reader, self.assignments = urls, reader, assignments
        self.buffer_size = max(buffer_size, 1)  # 1: no shuffling
        self.rng = np.random.default_rng(list(seed))
        self.shard, self.position, self.index = 0, 0, 0  # reading: assignment, offset in it, records seen
        self.buffer: list[tuple[dict, tuple[int, int, int, int]]] = []  # (raw, (shard, start, end, index))
        self.pending: np.ndarray | None = None  # buffer references of a saved state, re-read on iteration
        if state is not None:
            self.load_state_dict(state)

    def __iter__(self) -> Iterator[tuple[dict, str, int]]:
        if self.pending is not None:
            self.buffer, self.pending = self._reread(self.pending), None
        while self.shard < len(self.assignments):
            a = self.assignments[self.shard]
            for raw, start, end in self.reader.read(self.urls[a.shard], self.position):
                index = self.index
                self.position, self.index = end, index + 1
                if index % a.every != a.which:
                    continue  # another reader's record (a shared shard)
                self.buffer.append((raw, (self.shard, start, end, index)))
                if len(self.buffer) >= self.buffer_size:
                    yield self._pop()
            self.shard, self.position, self.index = self.shard + 1, 0, 0
        while self.buffer:
            yield self._pop()

    def _pop(self) -> tuple[dict, str, int]:
        if len(self.buffer) > 1:
            k = int(self.rng.integers(len(self.buffer)))
            self.buffer[k], self.buffer[-1] = self.buffer[-1], self.buffer[k]
        raw, (shard, _, _, index) = self.buffer.pop()
        return raw, self.urls[self.assignments[shard].shard], index

    def _reread(self, refs: np.ndarray) -> list[tuple[dict, tuple[int, int, int, int]]]:
        """The buffered records of a saved state, read by reference, in their saved order."""
        refs = [tuple(int(v) for v in row) for row in refs]
        raws: dict[tuple[int, int, int, int], dict] = {}
        for shard in sorted({r[0] for r in refs}):
            mine = [r for r in refs if r[0] == shard]
            url = self.urls[self.assignments[shard].shard]
            raws.update(zip(mine, self.reader.read_ranges(url, [(r[1], r[2]) for r in mine]), strict=True))
        return [(raws[r], r) for r in refs]

    def state_dict(self) -> dict:
        refs = self.pending if self.pending is not None else [ref for _, ref in self.buffer]
        return {
            "shard": self.shard,
            "position": self.position,
            "index": self.index,
            "buffer": np.asarray(refs, dtype=np.int64).reshape(-1, 4),
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        self.shard, self.position, self.index = state["shard"], state["position"], state["index"]
        self.pending = np.asarray(state["buffer"], dtype=np.int64).reshape(-1, 4)
        self.buffer = []
        self.rng.bit_generator.state = state["rng"]
