"""The image part of the dataset check: every distinct image path (or a random sample of them) is
checked once, by a thread pool: ``exists`` (fast mode: the file is there) or ``decode`` (full mode:
the whole image decodes, as data.image_files.decode_image does in training, at the size training resizes to).
Threads suffice: Pillow
releases the GIL while it decodes, and a network file system is latency-bound."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from data.image_files import ImageLoadError, decode_image

PATHS_PER_TASK = 64  # paths per thread-pool task: amortises the pool's per-task cost on cheap stat() calls


def check_image_batch(
    paths: list[str], decode: bool, image_size: int | None = None
) -> list[tuple[str, str, str]]:
    """(path, problem kind, message) for the bad images among ``paths``; ``image_size``: as in training."""
    bad = []
    for path in paths:
        if not decode:
            if not os.path.isfile(path):
                bad.append((path, "missing_image", f"image file not found: {path}"))
            continue
        try:
            decode_image(path, size=image_size)
        except ImageLoadError as e:
            kind = "missing_image" if isinstance(e.__cause__, FileNotFoundError) else "undecodable_image"
            bad.append((path, kind, str(e)))
    return bad


def check_images(
    paths: list[str], decode: bool, threads: int, progress: bool = False, image_size: int | None = None
) -> dict[str, tuple[str, str]]:
    """Check ``paths`` in parallel; returns {bad path: (problem kind, message)}."""
    batches = [paths[i : i + PATHS_PER_TASK] for i in range(0, len(paths), PATHS_PER_TASK)]
    bad: dict[str, tuple[str, str]] = {}
    with (
        ThreadPoolExecutor(max_workers=max(1, threads)) as pool,
        tqdm(total=len(paths), desc="data.check images", unit="img", disable=not progress) as bar,
    ):
        found_per_batch = pool.map(lambda b: check_image_batch(b, decode, image_size), batches)
        for batch, found in zip(batches, found_per_batch):
            bar.update(len(batch))
            for path, kind, message in found:
                bad[path] = (kind, message)
    return bad
