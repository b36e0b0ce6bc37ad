"""Counters of what the pipeline dropped or changed, so nothing disappears silently.

Workers cannot share counters with the main process, so each batch carries its own counts (the
``_stats`` key, stripped by the loader before the trainer sees the batch); the loader adds them here
and logs a summary at the end of every epoch. Bad image files travel the same way (``_bad_images``:
the file of every skipped sample); the distinct ones are kept here, for data.max_bad_images.
"""

from __future__ import annotations

import logging
from collections import Counter

logger = logging.getLogger("data.stats")

# Names of the counters (a batch's "_stats" dict uses the same keys).
SAMPLES = "samples"  # samples that reached a batch
DROPPED_TOO_LONG = "dropped_too_long"  # nothing supervised survives span-safe truncation
DROPPED_EMPTY_ANSWER = "dropped_empty_answer"  # a chat sample with an empty assistant answer (data.formats)
DROPPED_BAD_IMAGE = "dropped_bad_image"  # missing/corrupt image, skipped because max_bad_images allows it
DROPPED_BAD_SAMPLE = (
    "dropped_bad_sample"  # webdataset sample without a usable image/caption member (same cap)
)
# Drops of items the sampler gave (the loader advances the sampler past them too).
SAMPLER_DROPS = (DROPPED_TOO_LONG, DROPPED_EMPTY_ANSWER, DROPPED_BAD_IMAGE)
TRUNCATED = "truncated"  # cut at max_len (never inside an image span), still used
DROPPED_MISSING_IMAGE = (
    "dropped_missing_image"  # records removed when loaded: an image file is missing (once)
)
BAD_IMAGE_FILES = "bad_image_files"  # distinct missing or undecodable image files so far (total only)


class DataStats:
    """Counts per epoch and over the whole run."""

    def __init__(self) -> None:
        self.epoch: Counter[str] = Counter()
        self.total: Counter[str] = Counter()
        self.bad_images: dict[str, str] = {}  # distinct bad image file -> why (its first error message)

    def add(self, counts: dict[str, int]) -> None:
        for name, n in counts.items():
            self.epoch[name] += n
            self.total[name] += n

    def add_bad_image(self, path: str, message: str) -> bool:
        """Record a bad image file; True when it was not known before."""
        if path in self.bad_images:
            return False
        self.bad_images[path] = message
        self.total[BAD_IMAGE_FILES] = len(self.bad_images)
        return True

    def start_with_missing_images(self, missing: dict[str, str], dropped_records: int) -> None:
        """Files found missing when the data was loaded (file -> first record using it) and
        the records dropped."""
        for path, where in missing.items():
            self.add_bad_image(path, f"image file not found: {path} (referenced by {where})")
        if dropped_records:
            self.total[DROPPED_MISSING_IMAGE] = dropped_records

    def end_epoch(self, epoch: int) -> dict[str, int]:
        """Log and return this epoch's counts, then start a new epoch."""
        counts = dict(self.epoch)
        logger.info("data epoch %d: %s", epoch, format_counts(counts))
        self.epoch = Counter()
        return counts

    def state_dict(self) -> dict:
        return {"epoch": dict(self.epoch), "total": dict(self.total), "bad_images": dict(self.bad_images)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = Counter(state.get("epoch", {}))
        self.total = Counter(state.get("total", {}))
        self.bad_images = dict(state.get("bad_images", {}))


def format_counts(counts: dict[str, int]) -> str:
    keys = [SAMPLES, TRUNCATED, DROPPED_TOO_LONG, DROPPED_EMPTY_ANSWER, DROPPED_BAD_IMAGE, DROPPED_BAD_SAMPLE]
    keys += sorted(k for k in counts if k not in keys)
    return ", ".join(f"{k}={counts.get(k, 0)}" for k in keys)
