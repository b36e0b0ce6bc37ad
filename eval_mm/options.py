"""Command-line options shared by the evaluation commands (eval_mm.cli, eval_mm.model_commands, eval_mm.web):
argparse only, so a command that never loads a model parses its line without torch."""

from __future__ import annotations

import argparse

from eval_mm.metrics import MetricOptions
from models.errors import positive_int

# --prompt-format: auto reads the checkpoint (eval_mm.prompts.checkpoint_prompt_format)
PROMPT_FORMATS = ("auto", "chatml", "raw")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_metric_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--chartqa-reference-order",
        action="store_true",
        help="score ChartQA with the reference's swapped relaxed_correctness arguments",
    )
    parser.add_argument(
        "--box-divisor",
        type=positive_float,
        default=1000.0,
        help="map box coordinates back with x / DIVISOR * width (1000, as training; 999 = reference RefCOCO)",
    )
    parser.add_argument("--meteor", action="store_true", help="also compute METEOR for captions (needs Java)")


def metric_options(args) -> MetricOptions:
    return MetricOptions(
        chartqa_reference_order=args.chartqa_reference_order,
        box_divisor=args.box_divisor,
        with_meteor=args.meteor,
    )


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """Which export to load: ``--checkpoint`` and, for an adapter, ``--base`` (``eval run``, chat, web)."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="any export: a full one, merged/, an adapter, or a run's final/ (models.load_pretrained)",
    )
    parser.add_argument(
        "--base", default=None, help="the base an adapter goes on (default: its training_info.json init_from)"
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The checkpoint and decoding options of ``python -m eval_mm chat`` and ``python -m eval_mm.web``."""
    add_checkpoint_arguments(parser)
    parser.add_argument(
        "--system", default=None, help="the ChatML system message (default: the training default)"
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=512)
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sample at this temperature (default: greedy; 0 = greedy)",
    )
    parser.add_argument("--top-p", type=float, default=None, help="sample from the top-p nucleus")
    parser.add_argument("--top-k", type=positive_int, default=None, help="sample from the k likeliest tokens")
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of sampling (re-applied before every answer)"
    )
    parser.add_argument(
        "--prompt-format",
        choices=PROMPT_FORMATS,
        default="auto",
        help="auto: the one the checkpoint records (chatml after SFT, else raw)",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="auto: bfloat16 on GPU, float32 on CPU",
    )
