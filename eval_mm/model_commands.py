"""The evaluation commands that load a model: ``eval run`` and ``chat`` (eval_mm.cli parses their lines and
imports this module only when one of them runs, so ``eval score | compare | list`` load no torch)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from eval_mm.benchmarks import parse_bench_list
from eval_mm.chat import chat_from_args, interactive, one_shot
from eval_mm.options import metric_options
from eval_mm.prompts import checkpoint_prompt_format
from eval_mm.runner import evaluate, print_summary
from models.errors import UserError
from models.loading import is_family_model, load_pretrained, pick_device, resolve_export


def cmd_run(args) -> dict:
    benches = parse_bench_list(args.bench)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        model, tokenizer = load_pretrained(
            args.checkpoint, base=args.base, dtype=args.dtype, device=pick_device()
        )
        compiled = torch.cuda.is_available() if args.compile == "auto" else args.compile == "on"
        if compiled and is_family_model(model):  # the Qwen-VL model's compiled blocks and static cache only
            if args.compile == "on":
                raise UserError(
                    "--compile on: a family model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) is evaluated "
                    "uncompiled; use --compile off or auto"
                )
            compiled = False
        if compiled:
            model.compile_blocks(vision=True)
        weights_dir = resolve_export(
            args.checkpoint
        ).path  # merged/ or adapter/ of a run's final/: the format is there
        prompt_format = (
            checkpoint_prompt_format(weights_dir) if args.prompt_format == "auto" else args.prompt_format
        )
        results = evaluate(
            model,
            tokenizer,
            benches,
            args.data_root,
            args.out,
            limit=args.limit,
            batch_size=args.batch_size,
            prompt_format=prompt_format,
            metric_options=metric_options(args),
            num_workers=args.num_workers,
            static_cache=compiled,
        )
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


def cmd_chat(args) -> None:
    if args.json and args.prompt is None:
        raise UserError("--json needs --prompt (one question, one JSON line)")
    chat = chat_from_args(args)
    if args.prompt is not None:
        one_shot(chat, args.prompt, args.image, sys.stdout, as_json=args.json, draw=args.draw)
    else:
        for image in args.image:
            chat.add_image(image)
        interactive(chat, sys.stdin, sys.stdout, draw=args.draw)
