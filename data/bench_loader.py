"""DataLoader throughput on the synthetic world: samples/s at a given resolution per worker count.

    python -m data.bench_loader [--data DIR] [--image-size 448] [--workers 0 1 2 4] [--batches 20]

Without --data, a small synthetic world is generated in a temporary folder first. Measures the whole
pipeline a trainer sees (tokenise, decode + bicubic resize + normalise, collate/pack), after one warm-up
batch per run so worker start-up is not counted.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from data.dataset import DataConfig, build_dataloader


def measure(config: DataConfig, tokenizer, num_image_tokens: int, batch_size: int,
            batches: int) -> tuple[float, float]:
    """(samples/s, fraction of the batches' token slots that are padding)."""
    loader = build_dataloader(config, tokenizer, num_image_tokens, batch_size)
    it = iter(loader)
    next(it)  # warm-up: worker start-up and first prefetch
    n, real, slots, start = 0, 0, 0, time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        n += batch["num_samples"]
        real += sum(batch["sample_lengths"])
        slots += batch["input_ids"].numel()
    return n / (time.perf_counter() - start), 1 - real / max(slots, 1)


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    from data.synthetic import generate

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="a folder written by `python -m data.synthetic` (default: generate one)")
    p.add_argument("--file", default="sft.json", help="which training file of the world to read")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--num-image-tokens", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--packing", action="store_true")
    p.add_argument("--max-len", type=int, default=4096, help="per-sample token limit (and row length when packing)")
    p.add_argument("--pack-len", type=int, default=None, help="row length when packing (default --max-len)")
    a = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(a.data) if a.data else Path(tmp)
        if not a.data:
            generate(data, seed=0, n_train=a.batch_size * (a.batches + 2), n_eval=10)
        tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
        print(f"{data / a.file}: {a.image_size}px, batch {a.batch_size}, packing={a.packing}, max_len={a.max_len}, "
              f"pack_len={a.pack_len}")
        for workers in a.workers:
            cfg = DataConfig(paths=[str(data / a.file)], image_size=a.image_size, max_len=a.max_len,
                             num_workers=workers, packing=a.packing, pack_len=a.pack_len)
            rate, padding = measure(cfg, tokenizer, a.num_image_tokens, a.batch_size, a.batches)
            print(f"workers={workers:2d}  {rate:8.1f} samples/s  ({rate / max(workers, 1):.1f} per worker)  "
                  f"padding {padding:.1%} of token slots")


if __name__ == "__main__":
    main()
