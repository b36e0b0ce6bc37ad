"""Evaluation throughput of a full-scale random-weight model on synthetic prompts (GPU).

    python -m eval_mm.bench_throughput [--batch-size 8] [--batches 10] [--max-new-tokens 10] [--prompt-tokens 32]

Builds models.presets.qwen_vl_7b() with random weights in bf16 on the GPU and times the two eval
paths on prompts shaped like the reference's VQA prompts (one 448 px image = 258 tokens + text):
greedy generation through VLM.generate (every sample forced to max_new_tokens, so the number is
a fixed amount of work) and 4-option likelihood ranking (eval_mm.inference.rank_options). Prints one
JSON line with samples/s. Random weights: the speed is representative, the text is not.
"""

import argparse
import json
import time

import torch

from eval_mm.datasets import EvalSample
from eval_mm.inference import PromptBatch, rank_options
from models import build_vlm, presets

# Ids past the Qwen vocabulary's ordinary tokens, used as the image markers of this tokenizer-free model.
IMG_START_ID, IMG_END_ID, IMG_PAD_ID, PAD_ID = 151857, 151858, 151859, 151643


def synthetic_rows(batch: int, prompt_tokens: int, num_image_tokens: int, generator: torch.Generator) -> torch.Tensor:
    text = torch.randint(1000, 100000, (batch, prompt_tokens), generator=generator)
    image = torch.tensor([IMG_START_ID] + [IMG_PAD_ID] * num_image_tokens + [IMG_END_ID]).expand(batch, -1)
    return torch.cat([image, text], dim=1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=10, help="timed batches per path (after one warm-up)")
    parser.add_argument("--max-new-tokens", type=int, default=10, help="VQA budget of the reference")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--preset", choices=["qwen_vl_7b", "tiny"], default="qwen_vl_7b",
                        help="tiny: a CPU smoke test of this script")
    args = parser.parse_args(argv)
    if args.preset == "qwen_vl_7b" and not torch.cuda.is_available():
        raise SystemExit("bench_throughput needs a CUDA GPU for qwen_vl_7b (a 7B model in bf16)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    config = presets.qwen_vl_7b() if args.preset == "qwen_vl_7b" else presets.tiny(vocab_size=151936)
    config.image_start_id, config.image_end_id, config.image_pad_id, config.pad_token_id = (
        IMG_START_ID, IMG_END_ID, IMG_PAD_ID, PAD_ID)
    torch.manual_seed(0)
    model = build_vlm(config, dtype=dtype, device=device).eval()
    size = config.vision.image_size
    generator = torch.Generator().manual_seed(0)

    def generation_batch():
        ids = synthetic_rows(args.batch_size, args.prompt_tokens, config.num_image_tokens, generator)
        pixels = torch.randn(args.batch_size, 3, size, size)
        return ids.to(device), torch.ones_like(ids, device=device), pixels.to(device, dtype)

    @torch.no_grad()
    def run_generation():
        ids, mask, pixels = generation_batch()
        out = model.generate(ids, attention_mask=mask, pixel_values=pixels, do_sample=False, num_beams=1,
                             max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                             pad_token_id=PAD_ID, eos_token_id=PAD_ID, use_cache=True)
        return out.shape[1]

    def run_choice():
        ids = synthetic_rows(args.batch_size * 4, args.prompt_tokens + 1, config.num_image_tokens, generator)
        samples = [EvalSample(str(i), "", ("A", "B", "C", "D")) for i in range(args.batch_size)]
        batch = PromptBatch(samples, [""] * args.batch_size, ids, torch.ones_like(ids),
                            torch.randn(args.batch_size * 4, 3, size, size), [[1] * 4] * args.batch_size)
        rank_options(model, batch, device)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    results = {"preset": args.preset, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "batch_size": args.batch_size,
               "prompt_tokens": config.num_image_tokens + 2 + args.prompt_tokens,
               "max_new_tokens": args.max_new_tokens}
    for name, step in (("generate", run_generation), ("choice", run_choice)):
        step()  # warm-up (kernels, allocator)
        synchronize()
        start = time.perf_counter()
        for _ in range(args.batches):
            step()
        synchronize()
        elapsed = time.perf_counter() - start
        results[f"{name}_samples_per_s"] = round(args.batches * args.batch_size / elapsed, 2)
    if device.type == "cuda":
        results["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
