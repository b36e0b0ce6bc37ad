"""Training throughput measured where users run it: ``python -m train RECIPE`` itself, timed from its logs.

    python -m train.bench recipes/sft_lora.yaml model.init_from=null model.preset=qwen_vl_7b \\
        model.pad_vocab_to=151936 --workloads world 2048 --steps 20 --warmup 8

For every workload it runs the trainer as a subprocess (the recipe, the given overrides, the workload's data,
``train.stop_after_steps``) once per variant and reads ``metrics.jsonl``, which the training loop logs every
step here:

- ``recipe``: the recipe as shipped, with the overrides (only paths, steps and the model are expected);
- ``plain``: the anchor, the way the reference finetune.py trains with Hugging Face: one padded sample per
  row with an attention mask, SDPA, labels into the full-logit cross-entropy, every decoder layer
  checkpointed, fp32 master copies of frozen weights, nothing compiled; two samples per forward (the
  reference's per-device batch) with gradient accumulation to the recipe's samples per step (16 where the
  recipe bounds its micro-batches by tokens).

It prints tokens/s (sample tokens, row padding excluded) and samples/s over the steps after ``--warmup``,
MFU by the loop's model-FLOP convention (train/flops.py), the peak memory the loop logs
(torch.cuda.max_memory_allocated over the whole process, model build included), the start-up time (process
start to the first logged step) and the first step's loss. There is no second implementation of the step:
what is timed is train.loop.

Workloads (made once in ``--work``): ``world`` = the synthetic SFT world (``python -m data.synthetic``,
about 390 tokens and 1.1 images per sample); a number N = conversations of the world's turns, one image
each, cut at N tokens by ``data.max_len=N`` (so every sample has exactly N tokens). A DPO recipe
(``train.stage: dpo``) runs on the world's preference pairs (``dpo.json``); its tokens/s counts both
sequences of every pair.
"""

from __future__ import annotations

import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from data.synthetic import generate
from models.errors import ArgumentParser, UserError, non_negative_int, positive_int, run_cli
from train.recipe import load_recipe

PLAIN = [  # the reference's way (see the module docstring)
    "data.packing=false",
    "data.pack_len=null",
    "perf.attention=sdpa",
    "perf.loss_impl=torch",
    "perf.liger_kernels=false",
    "perf.compile_llm=false",
    "perf.compile_vision=false",
    "perf.frozen_bf16=false",
    "perf.check_image_spans=true",
    "perf.loss_at_label_positions=false",
    "perf.checkpoint_llm_layers=null",
    "train.max_forward_tokens=null",
    "perf.fused_lora=false",
    "perf.cudnn_attention=true",
    "train.memory_budget=null",
    "train.micro_batch_tokens=null",
]
PLAIN_SAMPLES_PER_STEP = 16  # the anchor's step where the recipe bounds micro-batches by tokens


@dataclass
class Result:
    workload: str
    variant: str
    steps: int
    tokens_per_s: float
    samples_per_s: float
    mfu: float | None
    peak_gib: float | None
    startup_s: float
    loss_first: float
    error: str = ""
    # The median step: a step whose shapes are new pays a one-time cost (on the H100 each step meeting an
    # image count not seen before took 0.2-0.5 s more, docs/benchmarks.md); a short window holds a few of
    # them, a long run almost none. Both figures come from the same steps.
    median_tokens_per_s: float = float("nan")


def make_world(work: Path, n_train: int) -> Path:
    world = work / "world"
    if not (world / "manifest.json").is_file():
        print(f"generating the synthetic world in {world} ...", flush=True)
        generate(world, seed=0, n_train=n_train)
    return world


def make_long_conversations(world: Path, tokens: int, count: int = 600) -> Path:
    """Conversations of at least ``tokens`` tokens: one image of the world, then question/answer turns of
    its SFT conversations (text-only turns) until long enough; ``data.max_len`` cuts them at ``tokens``."""
    out = world / f"long_{tokens}.json"
    if out.is_file():
        return out
    sft = json.loads((world / "sft.json").read_text())
    pairs = [
        (c["conversations"][i], c["conversations"][i + 1])
        for c in sft
        for i in range(0, len(c["conversations"]) - 1, 2)
        if "<img>" not in c["conversations"][i]["value"]
    ]
    images = [m for c in sft for m in re.findall(r"<img>(.*?)</img>", c["conversations"][0]["value"])]
    rng = random.Random(0)
    records = []
    for i in range(count):
        turns, chars = [], 0
        while chars < tokens * 8:  # the world's BPE averages fewer characters per token than this
            question, answer = rng.choice(pairs)
            turns += [dict(question), dict(answer)]
            chars += len(question["value"]) + len(answer["value"])
        turns[0]["value"] = f"Picture 1: <img>{rng.choice(images)}</img>\n{turns[0]['value']}"
        records.append({"id": f"long_{i}", "conversations": turns})
    out.write_text(json.dumps(records))
    return out


def workload_overrides(workload: str, world: Path, preference: bool = False) -> list[str]:
    """The data overrides of a workload; a DPO recipe (``preference``) trains on the world's pairs."""
    common = [f"model.tokenizer_path={world / 'tokenizer'}", "data.format=qwen", "data.max_bad_images=0"]
    if workload == "world":
        return [*common, f"data.paths=[{world / ('dpo.json' if preference else 'sft.json')}]"]
    if preference:
        raise UserError(
            f"workload {workload}: a DPO recipe runs on the 'world' workload (its preference pairs)"
        )
    long = make_long_conversations(world, int(workload))
    return [*common, f"data.paths=[{long}]", f"data.max_len={int(workload)}"]


def run_trainer(recipe: str, overrides: list[str], run_dir: Path, log: Path) -> tuple[float, list[dict], str]:
    """Run ``python -m train`` as a user would; returns (launch time, metrics rows, error or "")."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "train", recipe, *overrides]
    launched = time.time()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy()).returncode
    rows = (
        [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        if (run_dir / "metrics.jsonl").is_file()
        else []
    )
    error = "" if rc == 0 else f"exit {rc}: " + " | ".join(log.read_text().strip().splitlines()[-3:])[-400:]
    return launched, rows, error


def summarise(
    workload: str, variant: str, launched: float, rows: list[dict], warmup: int, error: str
) -> Result:
    timed = [r for r in rows if r["step"] > warmup]
    if error or not timed:
        return Result(
            workload,
            variant,
            0,
            float("nan"),
            float("nan"),
            None,
            None,
            float("nan"),
            float("nan"),
            error or "no step after warm-up was logged",
        )
    seconds = sum(r["window_s"] for r in timed)
    tokens = sum(r["tokens"] for r in timed)
    median = statistics.median(r["tokens"] / r["window_s"] for r in timed)
    samples = sum(r["samples_per_s"] * r["window_s"] for r in timed)
    mfu = [r["mfu"] * r["window_s"] for r in timed if "mfu" in r]
    return Result(
        workload,
        variant,
        len(timed),
        tokens / seconds,
        samples / seconds,
        sum(mfu) / seconds if mfu else None,
        max((r["peak_mem_gib"] for r in rows if "peak_mem_gib" in r), default=None),
        rows[0]["time"] - launched,
        rows[0]["loss"],
        median_tokens_per_s=median,
    )


def print_table(results: list[Result]) -> None:
    header = (
        f"{'workload':<10}{'variant':<9}{'steps':>6}{'tok/s':>10}{'median':>9}{'samp/s':>9}{'MFU':>8}"
        f"{'peak GiB':>10}{'start-up s':>12}{'loss@1':>9}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        if r.error:
            print(f"{r.workload:<10}{r.variant:<9}  FAILED: {r.error}")
            continue
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "-"
        peak = f"{r.peak_gib:.1f}" if r.peak_gib is not None else "-"
        print(
            f"{r.workload:<10}{r.variant:<9}{r.steps:>6}{r.tokens_per_s:>10,.0f}{r.median_tokens_per_s:>9,.0f}"
            f"{r.samples_per_s:>9.2f}{mfu:>8}"
            f"{peak:>10}{r.startup_s:>12.1f}{r.loss_first:>9.4f}"
        )


def main(argv: list[str] | None = None, prog: str = "python -m train.bench") -> None:
    p = ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        examples=[
            "recipes/sft_lora.yaml model.init_from=null model.preset=qwen_vl_7b "
            "model.pad_vocab_to=151936 --workloads world 2048 --steps 20 --warmup 8"
        ],
    )
    p.add_argument("recipe", help="a recipe YAML, e.g. recipes/sft_lora.yaml")
    p.add_argument("overrides", nargs="*", default=[], help="section.key=value overrides (model, paths, ...)")
    p.add_argument(
        "--workloads", nargs="+", default=["world"], help="'world' and/or a sample length, e.g. 2048"
    )
    p.add_argument("--variants", nargs="+", default=["plain", "recipe"], choices=["plain", "recipe"])
    p.add_argument(
        "--steps", type=positive_int, default=20, help="optimiser steps per run (train.stop_after_steps)"
    )
    p.add_argument(
        "--warmup",
        type=non_negative_int,
        default=8,
        help="steps left out of the averages (compilation, caches)",
    )
    p.add_argument("--work", default="runs/bench", help="where the data and the runs go")
    p.add_argument("--n-train", type=positive_int, default=2000, help="images of the synthetic world")
    p.add_argument(
        "--tag", default="", help="appended to the run folders' names (several runs in one --work)"
    )
    p.add_argument("--out", help="also write the results as JSON here")
    a = p.parse_args(argv)
    if a.steps <= a.warmup:
        p.error("--steps must exceed --warmup")

    preference = load_recipe(a.recipe, a.overrides).train.stage == "dpo"
    work = Path(a.work).resolve()
    world = make_world(work, a.n_train)
    results = []
    for workload in a.workloads:
        data = workload_overrides(workload, world, preference)
        for variant in a.variants:
            run_dir = work / f"run_{workload}_{variant}{a.tag}"
            overrides = [
                *data,
                *a.overrides,
                *(PLAIN if variant == "plain" else []),
                f"train.stop_after_steps={a.steps}",
                "log.every=1",
                "log.backend=console",
                "log.progress_bar=false",
                f"checkpoint.out_dir={run_dir}",
                "checkpoint.every=0",
                "eval.benches=[]",
                "train.resume=null",
            ]
            if variant == "plain":
                overrides += plain_batching(a.recipe, a.overrides)
            print(f"== {workload} / {variant}: log in {run_dir}.log", flush=True)
            launched, rows, error = run_trainer(a.recipe, overrides, run_dir, Path(f"{run_dir}.log"))
            r = summarise(workload, variant, launched, rows, a.warmup, error)
            results.append(r)
            print(
                f"   {r.tokens_per_s:,.0f} tok/s, peak {r.peak_gib} GiB, start-up {r.startup_s:.0f} s"
                if not r.error
                else f"   FAILED: {r.error}",
                flush=True,
            )
    print_table(results)
    if a.out:
        Path(a.out).write_text(
            json.dumps(
                {
                    "recipe": a.recipe,
                    "overrides": a.overrides,
                    "steps": a.steps,
                    "warmup": a.warmup,
                    "results": [asdict(r) for r in results],
                },
                indent=2,
            )
        )
        print(f"wrote {a.out}")


def plain_batching(recipe_path: str, overrides: list[str]) -> list[str]:
    """The anchor's batching: two samples per forward, accumulated to the recipe's samples per step; where
    the recipe bounds its micro-batches by tokens (train.micro_batch_tokens), to 16 samples a step (the
    Qwen-VL reference's per-GPU batch): one padded sample per row, the anchor's tokens/s does not depend
    on how many samples its step holds."""
    t = load_recipe(recipe_path, overrides).train
    per_step = t.micro_batch * t.grad_accum
    if t.micro_batch_tokens is not None:
        per_step = PLAIN_SAMPLES_PER_STEP * t.grad_accum
    return [f"train.micro_batch={min(2, per_step)}", f"train.grad_accum={max(1, per_step // 2)}"]


if __name__ == "__main__":
    run_cli(main)
