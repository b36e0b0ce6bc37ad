"""Evaluation throughput of a full-scale random-weight model on synthetic prompts (GPU).

    python -m eval_mm.bench_throughput [--variants baseline,batched,fast] [--batch-size 32]
        [--baseline-batch-size 8] [--batches 8] [--max-new-tokens 10] [--prompt-tokens 32] [--options 4]

Builds models.presets.qwen_vl_7b() with random weights in bf16 on the GPU and times both eval paths of
eval_mm.inference on prompts shaped like the reference's VQA prompts (one 448 px image = 258 tokens + text):
greedy generation (every sample forced to max_new_tokens, so the figure is a fixed amount of work) and
likelihood ranking of single-token option letters. Each variant runs both, in this order, in one process:

  baseline  the path before issue 11, the anchor: batches of 8, transformers' dynamic KV cache, nothing
            compiled, every option a full row with its own copy of the image (rank_options_per_row)
  batched   batches of 32; each multiple-choice prompt encoded once, options scored from its KV cache
            (rank_options); eager decoding
  fast      batched + one static KV cache reused across batches, whose decode step transformers compiles
            (CUDA graphs), + compiled vision blocks: what `eval_mm run` does on CUDA

Batches are made before timing (in real use DataLoader workers make them while the GPU works) and held in
pinned memory; their copy to the GPU is timed. Per variant it prints one JSON line as soon as it finishes
(samples/s, the warm-up time including compilation, peak GPU memory), then a table and one JSON line with
everything. Random weights: the speed is representative, the text is not. `--preset tiny` runs the same
code on CPU in seconds (a smoke test; nothing is compiled there).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from eval_mm.datasets import EvalSample
from eval_mm.inference import (
    PromptBatch,
    StaticCacheSlot,
    batch_to_device,
    generate_tokens,
    rank_options,
    rank_options_per_row,
)
from models import build_vlm, presets
from models.errors import ArgumentParser, UserError, non_negative_int, positive_int, run_cli

# Ids past the Qwen vocabulary's ordinary tokens, used as the image markers of this tokenizer-free model.
IMG_START_ID, IMG_END_ID, IMG_PAD_ID, PAD_ID = 151857, 151858, 151859, 151643
VARIANTS = ("baseline", "batched", "fast")  # always run in this order: "fast" compiles the shared model


def synthetic_batch(
    batch: int,
    prompt_tokens: int,
    options: int,
    num_image_tokens: int,
    image_size: int,
    generator: torch.Generator,
    pin: bool,
) -> PromptBatch:
    """`batch` prompts of <img> + pads + </img> + random text, one random image each, `options` letters."""
    text = torch.randint(1000, 100000, (batch, prompt_tokens), generator=generator)
    image = torch.tensor([IMG_START_ID] + [IMG_PAD_ID] * num_image_tokens + [IMG_END_ID]).expand(batch, -1)
    input_ids = torch.cat([image, text], dim=1)
    samples = [EvalSample(str(i), "", tuple(chr(ord("A") + k) for k in range(options))) for i in range(batch)]
    letters = [[1000 + k] for k in range(options)]  # one token each, like " A" in the Qwen vocabulary
    prompt_batch = PromptBatch(
        samples,
        [""] * batch,
        input_ids,
        torch.ones_like(input_ids),
        torch.randn(batch, 3, image_size, image_size, generator=generator),
        [1] * batch,
        [letters] * batch,
        PAD_ID,
    )
    return prompt_batch.pin_memory() if pin else prompt_batch


def run_variant(model, variant: str, args, device: torch.device) -> dict:
    """Warm up, then time `args.batches` batches of generation and of multiple choice."""
    batch_size = args.baseline_batch_size if variant == "baseline" else args.batch_size
    generator = torch.Generator().manual_seed(0)
    pool = [
        synthetic_batch(
            batch_size,
            args.prompt_tokens,
            args.options,
            model.config.num_image_tokens,
            model.config.vision.image_size,
            generator,
            pin=device.type == "cuda",
        )
        for _ in range(2)
    ]
    compiled = variant == "fast" and device.type == "cuda"
    slot = StaticCacheSlot(model.llm.config, rows=batch_size) if variant == "fast" else None
    rank = rank_options_per_row if variant == "baseline" else rank_options

    @torch.no_grad()
    def generate(batch: PromptBatch) -> None:
        generate_tokens(
            model,
            *batch_to_device(batch, model, device),
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens,
            stop_ids=[PAD_ID],
            static_cache=slot,
        )

    def choose(batch: PromptBatch) -> None:
        rank(model, batch, device)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result = {"variant": variant, "batch_size": batch_size}
    start = time.perf_counter()
    if compiled:
        model.compile_blocks(vision=True)
    for step in (generate, choose):  # kernels, allocator, compilation and CUDA graph capture
        for i in range(args.warmup):
            step(pool[i % 2])
    synchronize()
    result["warmup_s"] = round(time.perf_counter() - start, 1)
    for name, step in (("generate", generate), ("choice", choose)):
        start = time.perf_counter()
        for i in range(args.batches):
            step(pool[i % 2])
        synchronize()
        result[f"{name}_samples_per_s"] = round(args.batches * batch_size / (time.perf_counter() - start), 2)
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def parse_variants(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variants {unknown}; choose among {','.join(VARIANTS)}")
    return [v for v in VARIANTS if v in names]


def main(argv: list[str] | None = None, prog: str = "python -m eval_mm.bench_throughput") -> dict:
    parser = ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        examples=["--variants baseline,fast --batches 8"],
    )
    parser.add_argument(
        "--variants",
        type=parse_variants,
        default=list(VARIANTS),
        help=f"comma-separated, among {','.join(VARIANTS)} (default: all; always run in that order)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        help="prompts per batch of batched and fast (the default of `eval_mm run`)",
    )
    parser.add_argument(
        "--baseline-batch-size",
        type=positive_int,
        default=8,
        help="prompts per batch of baseline (the default before issue 11)",
    )
    parser.add_argument("--batches", type=positive_int, default=8, help="timed batches per path and variant")
    parser.add_argument(
        "--warmup", type=non_negative_int, default=1, help="untimed batches per path and variant first"
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=10, help="VQA budget of the reference")
    parser.add_argument("--prompt-tokens", type=positive_int, default=32, help="text tokens after the image")
    parser.add_argument(
        "--options", type=positive_int, default=4, help="letters ranked per multiple-choice prompt"
    )
    parser.add_argument(
        "--preset",
        choices=["qwen_vl_7b", "tiny"],
        default="qwen_vl_7b",
        help="tiny: a CPU smoke test of this script",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    args = parser.parse_args(argv)
    if args.preset == "qwen_vl_7b" and not torch.cuda.is_available():
        raise UserError(
            "bench_throughput needs a CUDA GPU for --preset qwen_vl_7b (a 7B model in bf16); "
            "--preset tiny runs on CPU"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    start = time.perf_counter()
    config = presets.qwen_vl_7b() if args.preset == "qwen_vl_7b" else presets.tiny(vocab_size=151936)
    config.image_start_id, config.image_end_id, config.image_pad_id, config.pad_token_id = (
        IMG_START_ID,
        IMG_END_ID,
        IMG_PAD_ID,
        PAD_ID,
    )
    torch.manual_seed(0)
    model = build_vlm(config, dtype=dtype, device=device).eval()
    results = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "prompt_tokens": config.num_image_tokens + 2 + args.prompt_tokens,
        "max_new_tokens": args.max_new_tokens,
        "options": args.options,
        "build_s": round(time.perf_counter() - start, 1),
        "variants": {},
    }
    for variant in args.variants:
        result = run_variant(model, variant, args, device)
        print(json.dumps(result), flush=True)
        results["variants"][variant] = result
    print_table(results)
    print(json.dumps(results))
    return results


def print_table(results: dict) -> None:
    print(
        f"\n{results['device']}, {results['preset']} {results['dtype']}, "
        f"prompts of {results['prompt_tokens']} tokens, "
        f"{results['max_new_tokens']} new tokens, {results['options']} options"
    )
    print(f"{'variant':10} {'batch':>5} {'generate/s':>11} {'choice/s':>9} {'warm-up s':>10} {'peak GiB':>9}")
    for r in results["variants"].values():
        peak = f"{r['peak_memory_gib']:.2f}" if "peak_memory_gib" in r else "-"  # CUDA only
        print(
            f"{r['variant']:10} {r['batch_size']:>5} {r['generate_samples_per_s']:>11.2f} "
            f"{r['choice_samples_per_s']:>9.2f} {r['warmup_s']:>10.1f} {peak:>9}"
        )


def _cli() -> int:
    main()
    return 0


if __name__ == "__main__":
    run_cli(_cli)
