"""Full-scale smoke test on one GPU: the Qwen-VL 7B shape in bf16 with random weights, forward +
backward at batch 1, one image. Prints peak memory and step time.

    python -m models.smoke_full_scale --seq 2048 [--steps 3] [--grad-ckpt]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from models import build_vlm, presets
from models.errors import ArgumentParser, UserError, positive_int, run_cli


def main(argv: list[str] | None = None, prog: str = "python -m models.smoke_full_scale") -> None:
    parser = ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        examples=["--seq 2048 --grad-ckpt"],
    )
    parser.add_argument(
        "--seq", type=positive_int, default=2048, help="tokens in the row (one image span included)"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=3, help="timed forward+backward steps after one warm-up"
    )
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in vision and LLM")
    parser.add_argument(
        "--tiny", action="store_true", help="dry-run the script with the tiny preset (CPU ok)"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise UserError(f"--device {args.device!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "no CUDA GPU here: the full-scale smoke test needs one (or --tiny --device cpu for a dry run)"
        )

    if args.tiny:
        cfg = presets.tiny(vocab_size=1000)
        cfg.image_start_id, cfg.image_end_id, cfg.image_pad_id, cfg.pad_token_id = 996, 997, 998, 999
    else:
        cfg = presets.qwen_vl_7b()
    vocab = cfg.text_config["vocab_size"]
    n = cfg.num_image_tokens
    if args.seq < n + 3:
        raise UserError(f"--seq must be at least {n + 3} (one image span of {n} tokens), got {args.seq}")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build_vlm(cfg, dtype=torch.bfloat16, device=device).train()
    if args.grad_ckpt:
        model.set_gradient_checkpointing(True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    build_s = time.perf_counter() - t0
    counts = {
        name: sum(p.numel() for p in getattr(model, name).parameters())
        for name in ("vision", "resampler", "llm")
    }

    text = torch.randint(0, cfg.image_start_id, (args.seq - n - 2,), device=device)
    span = torch.tensor([cfg.image_start_id] + [cfg.image_pad_id] * n + [cfg.image_end_id], device=device)
    input_ids = torch.cat([text[:8], span, text[8:]])[None]
    labels = input_ids.clone()
    labels[:, : n + 10] = -100
    pixel_values = torch.randn(
        1, 3, cfg.vision.image_size, cfg.vision.image_size, device=device, dtype=torch.bfloat16
    )

    def step() -> torch.Tensor:
        out = model(input_ids, pixel_values=pixel_values, labels=labels)
        out.loss.backward()
        model.zero_grad(set_to_none=False)  # keep grad buffers allocated: steady-state memory
        return out.loss.detach()

    step()  # warm-up (allocator, kernels)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    step_s = (time.perf_counter() - t0) / args.steps
    gib = 2**30
    print(f"device            {torch.cuda.get_device_name() if device.type == 'cuda' else device}")
    print("params            " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()))
    print(f"build             {build_s:.1f} s")
    print(f"seq {args.seq}, batch 1, 1 image, grad-ckpt {args.grad_ckpt}")
    print(f"loss              {loss.item():.3f}  (random weights: about ln(vocab) = {math.log(vocab):.1f})")
    print(f"fwd+bwd           {step_s * 1000:.0f} ms/step ({args.seq / step_s:.0f} tokens/s)")
    if device.type == "cuda":
        print(f"peak memory       {torch.cuda.max_memory_allocated() / gib:.1f} GiB allocated, "
              f"{torch.cuda.max_memory_reserved() / gib:.1f} GiB reserved")  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
