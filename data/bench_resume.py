"""Time a streamed resume at an early and a late position of an epoch: O(1) means equal within noise.

    python -m data.bench_resume [--format webdataset|jsonl] [--n-train 6000] [--shard-size 1000]
                                [--workers 2] [--batch-size 16] [--early 2] [--late 0.6] [--repeats 5]

Generates a synthetic world (its pretraining pairs as WebDataset shards, or as JSONL files of
``--shard-size`` lines), runs a loader to each position, saves ``loader.state_dict()`` as a checkpoint
would (a JSON round trip), and times what a resumed run waits for before its first batch: building the
loader, ``load_state_dict`` and the first batch (worker start-up, re-reading the shuffle buffers by
reference, decoding one batch). It prints the same time from the start of the epoch (the anchor) and how
long reading up to the late position took (what a resume that replays the epoch would pay at least).
The default late position (60% of the epoch) has full buffers and readers deep inside a shard; past
``epoch - workers x buffer`` samples the buffers drain and a resume gets cheaper still.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from data.dataset import DataConfig, build_dataloader
from data.synthetic import generate
from models.errors import ArgumentParser, run_cli


def position_after(config: DataConfig, tokenizer, batch_size: int, batches: int) -> tuple[dict, float]:
    """The loader state after ``batches`` batches (JSON round trip) and the seconds it took to get there."""
    loader = build_dataloader(config, tokenizer, num_image_tokens=16, batch_size=batch_size)
    start = time.perf_counter()
    it = iter(loader)
    for _ in range(batches):
        next(it)
    state = json.loads(json.dumps(loader.state_dict()))
    del it  # shuts the workers down
    return state, time.perf_counter() - start


def time_to_first_batch(config: DataConfig, tokenizer, batch_size: int, state: dict | None) -> float:
    start = time.perf_counter()
    loader = build_dataloader(config, tokenizer, num_image_tokens=16, batch_size=batch_size)
    if state is not None:
        loader.load_state_dict(state)
    next(iter(loader))
    return time.perf_counter() - start


def write_jsonl_shards(world: Path, shard_size: int) -> list[str]:
    lines = (world / "pretrain.jsonl").read_text().splitlines()
    paths = []
    for i in range(0, len(lines), shard_size):
        path = world / f"pretrain-{i // shard_size:06d}.jsonl"
        path.write_text("\n".join(lines[i : i + shard_size]) + "\n")
        paths.append(str(path))
    return paths


def main(argv: list[str] | None = None, prog: str = "python -m data.bench_resume") -> None:
    p = ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], examples=["--format webdataset --workers 2"]
    )
    p.add_argument("--format", choices=["webdataset", "jsonl"], default="webdataset")
    p.add_argument("--n-train", type=int, default=6000, help="samples in the epoch")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument(
        "--image-size", type=int, default=56, help="model input size (decoding is not what is timed)"
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--early", type=int, default=2, help="batches before the early checkpoint")
    p.add_argument(
        "--late", type=float, default=0.6, help="late checkpoint, as a fraction of the epoch's batches"
    )
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp)
        print(f"generating {a.n_train} pairs ...", flush=True)
        manifest = generate(
            world,
            seed=0,
            n_train=a.n_train,
            n_eval=2,
            vocab_size=400,
            webdataset_shard_size=a.shard_size if a.format == "webdataset" else None,
        )
        tokenizer = AutoTokenizer.from_pretrained(world / "tokenizer")
        if a.format == "webdataset":
            paths, fmt = [str(world / manifest["files"]["pretrain_webdataset"]["path"])], "webdataset"
        else:
            paths, fmt = write_jsonl_shards(world, a.shard_size), "pretrain"
        config = DataConfig(
            paths=paths,
            format=fmt,
            streaming=True,
            image_size=a.image_size,
            max_len=512,
            num_workers=a.workers,
            shuffle_buffer=a.shuffle_buffer,
        )
        epoch_batches = a.n_train // a.batch_size  # whole batches (workers' last ones may be partial)
        late = max(a.early + 1, int(a.late * epoch_batches))
        print(
            f"{a.format}: {a.n_train} samples in shards of {a.shard_size}, {a.workers} workers, batch "
            f"{a.batch_size}, shuffle buffer {a.shuffle_buffer}; positions: batch {a.early} and {late} of "
            f"~{epoch_batches}",
            flush=True,
        )
        rows = [("start of epoch (anchor)", None, 0.0)]
        for batches in (a.early, late):
            state, reach = position_after(config, tokenizer, a.batch_size, batches)
            rows.append((f"after batch {batches}", state, reach))
        times: list[list[float]] = [[] for _ in rows]
        for _ in range(a.repeats):  # interleaved, so that a shared machine's load weighs on each alike
            for row, (_, state, _) in zip(times, rows):
                row.append(time_to_first_batch(config, tokenizer, a.batch_size, state))
        for (name, _, reach), row in zip(rows, times):
            print(
                f"{name:26s} resume -> first batch: median {statistics.median(row):6.3f} s  "
                f"(min {min(row):.3f}, max {max(row):.3f}, {a.repeats} runs)"
                + (f"; reading up to it took {reach:.1f} s" if reach else ""),
                flush=True,
            )


if __name__ == "__main__":
    run_cli(main)
