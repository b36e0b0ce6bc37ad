"""python -m eval_mm run|score|list (see docs/evaluation.md)."""

import argparse
import json
import os
import sys
from pathlib import Path

from eval_mm.benchmarks import BENCHMARKS, get_benchmark, parse_bench_list
from eval_mm.metrics import MetricOptions
from eval_mm.prompts import PROMPT_FORMATS


def _add_metric_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chartqa-reference-order", action="store_true",
                        help="score ChartQA with the reference's swapped relaxed_correctness arguments")
    parser.add_argument("--box-divisor", type=float, default=1000.0,
                        help="map box coordinates back with x / DIVISOR * width (1000, as training; 999 = reference RefCOCO)")
    parser.add_argument("--meteor", action="store_true", help="also compute METEOR for captions (needs Java)")


def _metric_options(args) -> MetricOptions:
    return MetricOptions(chartqa_reference_order=args.chartqa_reference_order, box_divisor=args.box_divisor,
                         with_meteor=args.meteor)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval_mm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="evaluate a checkpoint (single device or under torchrun)")
    run.add_argument("--checkpoint", required=True, help="directory written by VLM.save_pretrained")
    run.add_argument("--bench", required=True, help="comma-separated benchmark names (see `list`)")
    run.add_argument("--data-root", required=True)
    run.add_argument("--out", required=True)
    run.add_argument("--limit", type=int, default=None, help="only the first N samples of each benchmark")
    run.add_argument("--batch-size", type=int, default=32,
                     help="prompts per batch (multiple choice: all options of a prompt count as one)")
    run.add_argument("--num-workers", type=int, default=None,
                     help="DataLoader workers (tokenising, image decoding); default 4 with CUDA, 0 on CPU")
    run.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto",
                     help="auto: chatml if the checkpoint records a chat format / SFT stage, else raw")
    run.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                     help="auto: bfloat16 on GPU, float32 on CPU")
    run.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                     help="on: a static KV cache whose decode step transformers compiles (CUDA graphs), and "
                          "compiled vision blocks; auto: on with CUDA (docs/evaluation.md)")
    _add_metric_options(run)

    score = sub.add_parser("score", help="score saved predictions without a model")
    score.add_argument("--bench", required=True)
    score.add_argument("--predictions", required=True, help="JSONL with 'id' and 'prediction' per line")
    score.add_argument("--annotations", required=True, help="the benchmark's annotation file (see `list`)")
    _add_metric_options(score)

    sub.add_parser("list", help="benchmarks, their data files and metrics")
    return parser


def cmd_list() -> None:
    print(f"{'benchmark':24} {'kind':9} {'metric':18} {'tokens':7} files (relative to --data-root)")
    for b in BENCHMARKS.values():
        files = b.test_file + (f" + {b.annotation_file}" if b.annotation_file else "")
        print(f"{b.name:24} {b.kind:9} {b.metric:18} {b.max_new_tokens:<7} {files}")


def cmd_score(args) -> dict:
    from eval_mm.datasets import load_references
    from eval_mm.metrics import compute_metric

    bench = get_benchmark(args.bench)
    references = load_references(bench, args.annotations)
    predictions = {}
    path = Path(args.predictions)
    if not path.exists():
        raise FileNotFoundError(f"predictions file not found: {path}")
    for index, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            predictions[str(record["id"])] = str(record["prediction"] if record["prediction"] is not None else "")
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{path} record {index}: need a JSON object with 'id' and 'prediction' ({e})") from e
    metrics = compute_metric(bench.metric, predictions, references, _metric_options(args),
                             where=f"{bench.name} ({path} vs {args.annotations})")
    print(json.dumps(metrics))
    return metrics


def load_checkpoint(checkpoint: str | Path, dtype_name: str = "auto"):
    """(model on its device in eval mode, tokenizer); clear errors for a wrong directory."""
    import torch

    from models import VLM

    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint}: not a checkpoint directory (no config.json)")
    if not any((checkpoint / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"{checkpoint}: checkpoint has no tokenizer (expected tokenizer.json or "
                                "tokenizer_config.json beside config.json; save it with VLM.save_pretrained "
                                "with a tokenizer attached)")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if dtype_name == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, dtype_name)
    model = VLM.from_pretrained(checkpoint, dtype=dtype, device=device).eval()
    if model.tokenizer is None:
        from models import load_tokenizer

        model.tokenizer = load_tokenizer(checkpoint)
    return model, model.tokenizer


def print_summary(results: dict[str, dict]) -> None:
    print(f"\n{'benchmark':24} {'samples':>8}  metrics")
    for bench, metrics in results.items():
        shown = {k: v for k, v in metrics.items() if "/" not in k and k not in ("num_samples",)}
        text = "  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        print(f"{bench:24} {metrics.get('num_samples', 0):>8}  {text}")


def cmd_run(args) -> dict:
    import torch
    import torch.distributed as dist

    from eval_mm.prompts import checkpoint_prompt_format
    from eval_mm.runner import evaluate

    benches = parse_bench_list(args.bench)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        model, tokenizer = load_checkpoint(args.checkpoint, args.dtype)
        compiled = torch.cuda.is_available() if args.compile == "auto" else args.compile == "on"
        if compiled:
            model.compile_blocks(vision=True)
        prompt_format = checkpoint_prompt_format(args.checkpoint) if args.prompt_format == "auto" else args.prompt_format
        results = evaluate(model, tokenizer, benches, args.data_root, args.out, limit=args.limit,
                           batch_size=args.batch_size, prompt_format=prompt_format,
                           metric_options=_metric_options(args), num_workers=args.num_workers,
                           static_cache=compiled)
        if not dist.is_initialized() or dist.get_rank() == 0:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
            print(f"prompt format: {prompt_format}")
            print_summary(results)
            print(json.dumps(results))
        return results
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        cmd_list()
    elif args.command == "score":
        cmd_score(args)
    else:
        cmd_run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
