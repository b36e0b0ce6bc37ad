"""Speed of the dataset check on a large Qwen-format file built from the synthetic world.

    python -m data.bench_check --world DIR [--records 1000000] [--workers 2] [--tokenizer DIR]
        [--image-threads 8] [--image-size 112]

Generates the synthetic world in DIR if it is not there (python -m data.synthetic), writes
DIR/sft_big.jsonl: the world's sft.json conversations cycled to --records records, each turn made
unique (the record number added to it, as real data has no two turns alike, so no tokenisation is
saved by repeats), all reusing the world's 2,000 images. Then runs the fast check (text and tokens,
images only checked to exist) and the image part of the full check (every distinct image decoded),
and prints records/s and images/s, with the wall time, the CPU time and the load average.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

from data.check import CheckOptions, check_data
from data.dataset import DataConfig
from data.synthetic import generate
from models import load_tokenizer
from models.errors import ArgumentParser, run_cli


def write_big_file(world: Path, records: int) -> Path:
    path = world / f"sft_{records}.jsonl"
    if path.exists():
        return path
    base = json.loads((world / "sft.json").read_text())
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(records):
            record = base[i % len(base)]
            turns = [
                {
                    "from": t["from"],  # user: a prefix (a grounding prompt may end with an open <box>)
                    "value": f"({i}) {t['value']}" if t["from"] == "user" else f"{t['value']} ({i})",
                }
                for t in record["conversations"]
            ]
            f.write(json.dumps({"id": f"big_{i}", "conversations": turns}) + "\n")
    tmp.rename(path)
    return path


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None, prog: str = "python -m data.bench_check") -> None:
    p = ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        examples=["--world runs/world --records 100000 --workers 2"],
    )
    p.add_argument("--world", required=True, help="synthetic world folder (generated if missing)")
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument(
        "--workers", type=int, default=None, help="processes for the text part (default: one per core)"
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the world's)")
    p.add_argument("--image-tokens", type=int, default=256)
    p.add_argument("--image-threads", type=int, default=8)
    p.add_argument(
        "--image-size", type=int, default=112, help="side of the world's images when generating it"
    )
    args = p.parse_args(argv)

    world = Path(args.world)
    if not (world / "sft.json").exists():
        generate(world, image_size=args.image_size)
    start = time.perf_counter()
    path = write_big_file(world, args.records)
    print(
        f"{path}: {args.records:,} records, {path.stat().st_size / 2**20:,.0f} MiB "
        f"(written in {time.perf_counter() - start:.0f} s, or reused)"
    )
    tokenizer = load_tokenizer(args.tokenizer or world / "tokenizer")
    config = DataConfig(paths=[str(path)], format="qwen", max_len=2048)
    for mode in ("fast", "full"):
        load, cpu, wall = os.getloadavg()[0], cpu_seconds(), time.perf_counter()
        # full: only its image part is new; the world's first 2,000 records reference every image
        options = CheckOptions(
            mode=mode,
            workers=args.workers,
            image_threads=args.image_threads,
            limit=None if mode == "fast" else 2000,
        )
        report = check_data(config, tokenizer, args.image_tokens, options).report
        cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
        t = report["timing"]
        if mode == "fast":
            print(
                f"fast: {report['records']:,} records in {t['text_seconds']:.0f} s = "
                f"{t['records_per_second']:,} records/s with {report['check']['workers']} workers "
                f"({report['tokens']['used']:,} tokens); "
                f"images checked to exist: {report['images']['checked']:,} in {t['image_seconds']:.2f} s; "
                f"whole check {wall:.0f} s wall, {cpu:.0f} s CPU ({report['records'] / cpu:,.0f} records per "
                f"CPU-second); load average {load:.1f} at the start"
            )
            print(f"  problems: { {k: v['count'] for k, v in report['problems'].items()} }")
        else:
            print(
                f"full, image part: {report['images']['checked']:,} distinct images decoded in "
                f"{t['image_seconds']:.2f} s = {t['images_per_second']:,} images/s "
                f"with {args.image_threads} threads; "
                f"load average {load:.1f} at the start"
            )


if __name__ == "__main__":
    run_cli(main)
