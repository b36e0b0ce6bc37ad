"""Deterministic, rank-sharded, resumable sample order.

The order of an epoch is a pure function of (seed, epoch, dataset size, world size): a permutation
drawn from ``numpy.random.default_rng([seed, epoch])``, optionally grouped by length, padded by
repeating its head so every rank gets the same number of samples (as torch's DistributedSampler), and
dealt to ranks round-robin (rank r takes positions r, r + W, ...). The position inside an epoch
(``consumed``, in samples of this rank) is advanced by the loader as batches are handed to the trainer
(not as workers prefetch them) and saved with ``state_dict()``, so a resumed run sees exactly the
samples it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from models.errors import UserError


class ResumableSampler(Sampler[int]):
    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        lengths: Sequence[int] | None = None,
        group_size: int = 64,
    ) -> None:
        """``lengths`` (token counts per sample) turns on length grouping: the shuffled order is cut
        into windows of ``group_size * world_size`` samples, each sorted by length (longest first),
        so consecutive batches hold samples of similar length (the alternative to packing)."""
        if num_samples <= 0:
            raise ValueError("the dataset is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"{len(lengths)} lengths for {num_samples} samples")
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.shuffle, self.lengths, self.group_size = shuffle, lengths, group_size
        self.epoch = 0
        self.consumed = 0  # samples of this rank already handed to the trainer in this epoch

    @property
    def per_rank(self) -> int:
        return -(-self.num_samples // self.world_size)  # ceil

    def epoch_order(self, epoch: int) -> list[int]:
        """The global order of an epoch (before dealing to ranks)."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        if self.lengths is not None:
            lengths = np.asarray(self.lengths)
            window = self.group_size * self.world_size
            order = np.concatenate(
                [
                    chunk[np.argsort(-lengths[chunk], kind="stable")]
                    for chunk in np.array_split(order, range(window, len(order), window))
                ]
            )
        total = self.per_rank * self.world_size
        order = np.resize(order, total)  # repeats from the start to fill the last round
        return order.tolist()

    def rank_indices(self, epoch: int) -> list[int]:
        return self.epoch_order(epoch)[self.rank :: self.world_size]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def advance(self, n: int) -> None:
        """Mark n more samples of this rank as consumed (called by the loader per delivered batch)."""
        self.consumed = min(self.per_rank, self.consumed + n)

    def __iter__(self) -> Iterator[int]:
        start = self.consumed  # read now: the DataLoader creates this iterator before advancing starts
        return iter(self.rank_indices(self.epoch)[start:])

    def __len__(self) -> int:
        return self.per_rank - self.consumed

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "consumed": self.consumed,
            "num_samples": self.num_samples,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_samples", "world_size"):
            if state[key] != getattr(self, key):
                raise UserError(
                    f"sampler state was saved with {key}={state[key]}, now {getattr(self, key)}: "
                    "the resumed order would differ"
                )
        self.epoch, self.consumed = state["epoch"], state["consumed"]


def token_batches(
    indices: Iterable[int], lengths: Sequence[int], max_tokens: int, max_samples: int
) -> Iterator[list[int]]:
    """Consecutive samples grouped greedily, in order: a batch closes when the next sample would bring its
    tokens above ``max_tokens`` or its count above ``max_samples``; a sample longer than ``max_tokens`` is a
    batch of its own. A pure function of where it starts, so a run resumed at a batch boundary forms the
    same batches as the run it continues."""
    batch: list[int] = []
    tokens = 0
    for i in indices:
        n = lengths[i]
        if batch and (tokens + n > max_tokens or len(batch) == max_samples):
            yield batch
            batch, tokens = [], 0
        batch.append(i)
        tokens += n
    if batch:
        yield batch


class TokenBatchSampler(Sampler[list[int]]):
    """Micro-batches bounded by tokens (``train.micro_batch_tokens``) over a ResumableSampler's order.

    At native resolution a sample's token count is set by its images (4 to 16,384 tokens an image in the
    Hugging Face families): a fixed number of samples makes steps of very different work and memory, and
    short samples leave a packed row mostly empty. Batching by tokens keeps every step near the same work,
    as fairseq's ``--max-tokens`` does. The position stays the ResumableSampler's (samples consumed, advanced
    by the loader as batches are delivered), so resume and rank sharding are unchanged; ranks may form
    different numbers of batches in an epoch (the trainer runs the same number of steps on every rank)."""

    def __init__(
        self, sampler: ResumableSampler, lengths: Sequence[int], max_tokens: int, max_samples: int
    ) -> None:
        if len(lengths) != sampler.num_samples:
            raise ValueError(f"{len(lengths)} lengths for {sampler.num_samples} samples")
        self.sampler, self.lengths = sampler, lengths
        self.max_tokens, self.max_samples = max_tokens, max_samples

    def __iter__(self) -> Iterator[list[int]]:
        return token_batches(self.sampler, self.lengths, self.max_tokens, self.max_samples)

    def __len__(self) -> int:
        """Batches left in this epoch."""
        return sum(1 for _ in self)
