"""Counters of what the pipeline dropped or changed, so nothing disappears silently.

Workers cannot share counters with the main process, so each batch carries its own counts (the
``_stats`` key, stripped by the loader before the trainer sees the batch); the loader adds them here
and logs a summary at the end of every epoch.
"""

from __future__ import annotations

import logging
from collections import Counter

logger = logging.getLogger("data.stats")

# Names of the counters (a batch's "_stats" dict uses the same keys).
SAMPLES = "samples"  # samples that reached a batch
DROPPED_TOO_LONG = "dropped_too_long"  # nothing supervised survives span-safe truncation
DROPPED_BAD_IMAGE = "dropped_bad_image"  # missing/corrupt image, skipped because max_bad_images allows it
DROPPED_BAD_SAMPLE = "dropped_bad_sample"  # webdataset sample without a usable image/caption member (same cap)
TRUNCATED = "truncated"  # cut at max_len (never inside an image span), still used


class DataStats:
    """Counts per epoch and over the whole run."""

    def __init__(self) -> None:
        self.epoch: Counter[str] = Counter()
        self.total: Counter[str] = Counter()

    def add(self, counts: dict[str, int]) -> None:
        for name, n in counts.items():
            self.epoch[name] += n
            self.total[name] += n

    def end_epoch(self, epoch: int) -> dict[str, int]:
        """Log and return this epoch's counts, then start a new epoch."""
        counts = dict(self.epoch)
        logger.info("data epoch %d: %s", epoch, format_counts(counts))
        self.epoch = Counter()
        return counts

    def state_dict(self) -> dict:
        return {"epoch": dict(self.epoch), "total": dict(self.total)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = Counter(state.get("epoch", {}))
        self.total = Counter(state.get("total", {}))


def format_counts(counts: dict[str, int]) -> str:
    keys = [SAMPLES, TRUNCATED, DROPPED_TOO_LONG, DROPPED_BAD_IMAGE, DROPPED_BAD_SAMPLE]
    keys += sorted(k for k in counts if k not in keys)
    return ", ".join(f"{k}={counts.get(k, 0)}" for k in keys)
