"""AdamW parameter groups (weight decay, ViT layer-wise lr decay) and the lr schedule.

The schedule is a plain ``torch.optim.lr_scheduler.LambdaLR``; under DeepSpeed the same object is
handed to the engine so it really applies (the reference's DeepSpeed config silently replaced the
cosine schedule by a constant lr after warmup, QwenLM/Qwen-VL#183).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from models.errors import UserError
from train.recipe import OptimSection, ScheduleSection

# Parameters that are not weights of a matmul: no weight decay.
_NO_DECAY_SUFFIXES = ("bias", "pos_embed", "query")
_VIT_BLOCK = re.compile(r"(?:^|\.)vision\.blocks\.(\d+)\.")


def vit_lr_scale(name: str, num_blocks: int, decay: float) -> float:
    """Layer-wise lr decay (BEiT style) for the vision tower; 1.0 for everything else.

    Block i gets decay ** (num_blocks - i) (the last block decay ** 1); the patch embedding,
    position table and ln_pre, which sit below block 0, get decay ** (num_blocks + 1).
    """
    if decay == 1.0 or ".vision." not in f".{name}":
        return 1.0
    match = _VIT_BLOCK.search(name)
    depth = int(match.group(1)) if match else -1
    return decay ** (num_blocks - depth)


def param_groups(model: nn.Module, cfg: OptimSection, num_vit_blocks: int) -> list[dict]:
    """Trainable parameters grouped by (lr scale, weight decay). Each group carries ``lr_scale``."""
    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim < 2 or name.endswith(_NO_DECAY_SUFFIXES)
        wd = 0.0 if no_decay else cfg.weight_decay
        scale = vit_lr_scale(name, num_vit_blocks, cfg.vit_layer_decay)
        group = groups.setdefault(
            (scale, wd),
            {"params": [], "names": [], "lr": cfg.lr * scale, "lr_scale": scale, "weight_decay": wd},
        )
        group["params"].append(param)
        group["names"].append(name)
    if not groups:
        raise UserError("no trainable parameters: check the recipe's freeze / lora sections")
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimSection, num_vit_blocks: int) -> torch.optim.AdamW:
    groups = param_groups(model, cfg, num_vit_blocks)
    for g in groups:
        del g["names"]  # torch keeps unknown group keys in state_dict; names are only for inspection
    # The fused CUDA kernel: one launch for all tensors and no foreach temporaries (as large as the
    # trainable state); the update is the same AdamW.
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_cuda and p.dtype in (torch.float32, torch.bfloat16) for p in params)
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused or None
    )


def lr_factor(step: int, total_steps: int, lr: float, cfg: ScheduleSection) -> float:
    """Multiplier of the base lr at optimiser step ``step`` (0-based): linear warmup, then cosine
    from lr to min_lr over the remaining steps (or constant)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    floor = cfg.min_lr / lr if lr > 0 else 0.0
    decay_steps = max(1, total_steps - cfg.warmup_steps - 1)  # the last step runs at min_lr
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, lr: float, cfg: ScheduleSection
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, lr, cfg))
