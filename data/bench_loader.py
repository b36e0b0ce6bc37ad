"""DataLoader throughput on the synthetic world: samples/s at a given resolution per worker count.

    python -m data.bench_loader [--data DIR] [--image-size 448] [--workers 0 1 2 4] [--batches 20]
    python -m data.bench_loader --webdataset [--source-size 384] [--image-size 224]
        [--workers 16 --batches 200]

Without --data, a small synthetic world is generated in a temporary folder first. Measures the whole
pipeline a trainer sees (tokenise, decode + bicubic resize + normalise, collate/pack), after one warm-up
batch per worker so worker start-up (and, streamed, filling the shuffle buffers) is not counted. Prints
samples/s in total and per worker.

``--webdataset``: the world's pretraining pairs, drawn at ``--source-size`` px and stored as JPEG
(quality 90, as img2dataset writes) in WebDataset shards of ``--shard-size`` samples, streamed as
``data.format: webdataset`` would be (shuffle buffer ``--shuffle-buffer``).
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path

import psutil
from PIL import Image

from data.dataset import DataConfig, build_dataloader
from data.synthetic import generate
from data.webdataset import shard_pattern, write_shards
from models.build import load_tokenizer
from models.errors import ArgumentParser, MissingFileError, non_negative_int, positive_int, run_cli


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its DataLoader workers so far."""
    me = psutil.Process()
    total = 0.0
    for proc in (me, *me.children(recursive=True)):
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def measure(
    config: DataConfig, tokenizer, num_image_tokens: int, batch_size: int, batches: int
) -> tuple[float, float, float]:
    """(samples/s, samples per CPU-second, fraction of the batches' token slots that are padding).

    Samples per CPU-second (main process + workers over the timed batches) is what one free core
    delivers: on a shared machine it holds where wall-clock rates sink with the load."""
    loader = build_dataloader(config, tokenizer, num_image_tokens, batch_size)
    it = iter(loader)
    for _ in range(max(config.num_workers, 1)):
        next(it)  # warm-up: worker start-up and first prefetch (a batch from each worker)
    n, real, slots, start, cpu = 0, 0, 0, time.perf_counter(), cpu_seconds()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        n += batch["num_samples"]
        real += sum(batch["sample_lengths"])
        slots += batch["input_ids"].numel()
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return n / wall, n / max(cpu, 1e-9), 1 - real / max(slots, 1)


def write_jpeg_shards(world: Path, shard_size: int) -> str:
    """The world's pretraining pairs as WebDataset shards of JPEG images; returns the brace pattern."""

    def samples():
        for line in (world / "pretrain.jsonl").read_text().splitlines():
            pair = json.loads(line)
            jpeg = io.BytesIO()
            with Image.open(world / pair["image"]) as img:
                img.convert("RGB").save(jpeg, format="JPEG", quality=90)
            yield {
                "__key__": Path(pair["image"]).stem,
                "jpg": jpeg.getvalue(),
                "txt": pair["caption"].encode(),
            }

    return shard_pattern(write_shards(samples(), world / "jpeg_shards", "pretrain", shard_size))


def main(argv: list[str] | None = None, prog: str = "python -m data.bench_loader") -> None:
    p = ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], examples=["--image-size 448 --workers 0 1 2 4"]
    )
    p.add_argument("--data", help="a folder written by `python -m data.synthetic` (default: generate one)")
    p.add_argument("--file", default="sft.json", help="which training file of the world to read")
    p.add_argument("--image-size", type=positive_int, default=448)
    p.add_argument("--num-image-tokens", type=positive_int, default=256)
    p.add_argument("--workers", type=non_negative_int, nargs="+", default=[0, 1, 2, 4])
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--batches", type=positive_int, default=20)
    p.add_argument("--packing", action="store_true")
    p.add_argument(
        "--max-len",
        type=positive_int,
        default=4096,
        help="per-sample token limit (and row length when packing)",
    )
    p.add_argument(
        "--pack-len", type=positive_int, default=None, help="row length when packing (default --max-len)"
    )
    p.add_argument(
        "--webdataset", action="store_true", help="stream the pretraining pairs from JPEG WebDataset shards"
    )
    p.add_argument(
        "--source-size",
        type=positive_int,
        default=None,
        help="side of the generated images in px (default: 384 with --webdataset, else 112)",
    )
    p.add_argument(
        "--shard-size",
        type=positive_int,
        default=None,
        help="--webdataset: samples per shard (default: 2 shards per worker of the largest count)",
    )
    p.add_argument(
        "--shuffle-buffer", type=positive_int, default=1000, help="--webdataset: records each worker mixes"
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    a = p.parse_args(argv)
    if a.pack_len is not None and (not a.packing or a.pack_len < a.max_len):
        p.error("argument --pack-len: needs --packing and a value >= --max-len")
    if a.data and not Path(a.data).is_dir():
        raise MissingFileError(
            f"--data {a.data}: no such folder (write one with `python -m data.synthetic --out DIR`)"
        )

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(a.data) if a.data else Path(tmp)
        if not a.data:
            # enough samples that every worker delivers its warm-up batch and the timed ones
            n_train = a.batch_size * (a.batches + 2 * max(a.workers) + 2)
            print(f"generating {n_train} synthetic samples ...", flush=True)
            generate(
                data,
                seed=0,
                n_train=n_train,
                n_eval=10,
                image_size=a.source_size or (384 if a.webdataset else 112),
            )
        tokenizer = load_tokenizer(data / "tokenizer")
        if a.webdataset:
            pairs = len((data / "pretrain.jsonl").read_text().splitlines())
            shard_size = a.shard_size or max(1, pairs // (2 * max(*a.workers, 1)))
            paths, fmt = [write_jpeg_shards(data, shard_size)], "webdataset"
            what = (
                f"{paths[0]} ({pairs} pairs): {a.source_size or 384}px JPEG in shards of {shard_size}, "
                f"shuffle buffer {a.shuffle_buffer}"
            )
        else:
            paths, fmt, what = [str(data / a.file)], "auto", str(data / a.file)
        print(
            f"{what}: {a.image_size}px, batch {a.batch_size}, packing={a.packing}, max_len={a.max_len}, "
            f"pack_len={a.pack_len}"
        )
        for workers in a.workers:
            cfg = DataConfig(
                paths=paths,
                format=fmt,
                image_size=a.image_size,
                max_len=a.max_len,
                num_workers=workers,
                packing=a.packing,
                pack_len=a.pack_len,
                shuffle_buffer=a.shuffle_buffer,
            )
            rate, per_cpu, padding = measure(cfg, tokenizer, a.num_image_tokens, a.batch_size, a.batches)
            print(
                f"workers={workers:2d}  {rate:8.1f} samples/s in total  "
                f"({rate / max(workers, 1):.1f} per worker)  "
                f"{per_cpu:6.1f} samples per CPU-second  padding {padding:.1%} of token slots",
                flush=True,
            )


if __name__ == "__main__":
    run_cli(main)
