"""The vision tower: a pre-LN ViT with Qwen-VL's semantics (reference section 1.2).

Conv patch embedding without bias, no class token, a learned position table bicubically resized to
the patch grid, ``ln_pre``, pre-LN blocks with exact GELU, and no final LayerNorm at width (the
resampler's ``ln_post`` comes after the resampler). Output: one feature per patch, [B, grid², width].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.config import VisionConfig


def resize_pos_table(table: torch.Tensor, num_positions: int) -> torch.Tensor:
    """Bicubically resize a square position table [S*S, C] to [T*T, C] (T*T = num_positions).

    Interpolation runs in float32 with align_corners=False and the result is cast back, as in the
    reference's ``get_abs_pos``; an equal size returns the table unchanged.
    """
    src = int(round(table.shape[0] ** 0.5))
    tgt = int(round(num_positions**0.5))
    if src * src != table.shape[0] or tgt * tgt != num_positions:
        raise ValueError(f"position tables must be square grids, got {table.shape[0]} -> {num_positions}")
    if src == tgt:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(tgt * tgt, -1).to(table.dtype)


class ResizedPosTable:
    """``resize_pos_table`` of a table that is not training (a frozen ViT's, the resampler's sin-cos buffer),
    computed once and reused while the table and the target size stay the same. torch's fp32 bicubic kernel
    takes ~16 ms on an H100 for a 16x16 -> 32x32 table of width 1664, and every forward resized two such
    tables to the same result (2-4% of a LoRA step). A table that trains is resized every call, in the graph.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: torch.Tensor | None = None

    def __call__(self, table: torch.Tensor, num_positions: int) -> torch.Tensor:
        if table.requires_grad and torch.is_grad_enabled():
            return resize_pos_table(table, num_positions)
        # _version changes with every in-place write (load_state_dict, an optimiser step),
        # data_ptr with a move.
        key = (table.data_ptr(), table._version, table.dtype, table.device, num_positions)
        if key != self.key:
            self.key, self.value = key, resize_pos_table(table.detach(), num_positions)
        return self.value


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection laid out [q; k; v] (each head-contiguous)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # [B, N, 3, H, Dh] -> three [B, H, N, Dh]
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, width: int, mlp_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as OpenCLIP ViT-bigG and Qwen-VL


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = Attention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg.width, cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(
            3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.pos_embed = nn.Parameter(cfg.width**-0.5 * torch.randn(cfg.pos_grid**2, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.gradient_checkpointing = False  # recompute each block in backward (saves activations)
        self.resized_pos_embed = ResizedPosTable()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, (H/patch)*(W/patch), width]. H and W need not equal ``image_size``
        but must give a square patch grid."""
        x = pixel_values.to(dtype=self.patch_embed.weight.dtype)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, width]
        x = x + self.resized_pos_embed(self.pos_embed, x.shape[1])
        x = self.ln_pre(x)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x
