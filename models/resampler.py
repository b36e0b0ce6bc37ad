"""The position-aware resampler (reference section 1.3): N learned queries cross-attend to the patch
features, then LayerNorm and a bias-free d x d projection. Output [num_images, N, d_llm].

Positions are 2D sin-cos (MAE style) on the sqrt(N) x sqrt(N) query grid: added unchanged to the
queries, bicubically resized to the patch grid for the keys, and never added to the values.
"""

from __future__ import annotations

import torch
from torch import nn

from models.config import ResamplerConfig
from models.vision import ResizedPosTable


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, dim]: sin(pos * omega) then cos(pos * omega), omega_i = 10000^(-i / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """[grid_size², dim] float32 table, row-major over (row, column) positions.

    As in the reference ("w goes first"), the first half of the channels encodes the column (x)
    coordinate and the second half the row (y) coordinate. Computed in float64.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos needs dim divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(
        torch.arange(grid_size, dtype=torch.float64),
        torch.arange(grid_size, dtype=torch.float64),
        indexing="ij",
    )
    emb = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    return emb.float()


class Resampler(nn.Module):
    def __init__(self, cfg: ResamplerConfig, kv_dim: int, dim: int):
        super().__init__()
        if dim % cfg.head_dim:
            raise ValueError(f"LLM hidden size {dim} is not divisible by resampler head_dim {cfg.head_dim}")
        self.cfg = cfg
        self.query = nn.Parameter(torch.empty(cfg.num_queries, dim))
        # A buffer (saved, never trained) so converted checkpoints keep their exact values.
        self.register_buffer("pos_embed", sincos_2d(dim, cfg.grid), persistent=True)
        self.resized_pos_embed = ResizedPosTable()  # the keys' positions on the patch grid, resized once
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False)
        self.attn = nn.MultiheadAttention(dim, dim // cfg.head_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(dim, eps=cfg.ln_eps)
        self.ln_kv = nn.LayerNorm(dim, eps=cfg.ln_eps)
        self.ln_post = nn.LayerNorm(dim, eps=cfg.ln_eps)
        self.proj = nn.Parameter(torch.empty(dim, dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference's initialisation: trunc-normal(.02) for the queries and Linear weights (zero
        Linear biases), d^-0.5 * randn for ``proj``; in_proj and LayerNorms keep torch's defaults."""
        nn.init.trunc_normal_(self.query, std=0.02)
        nn.init.trunc_normal_(self.kv_proj.weight, std=0.02)
        nn.init.trunc_normal_(self.attn.out_proj.weight, std=0.02)
        nn.init.zeros_(self.attn.out_proj.bias)
        self.proj.normal_(0.0, self.proj.shape[0] ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch features [B, P, kv_dim] (P a square) -> [B, N, d]."""
        pos_k = self.resized_pos_embed(self.pos_embed, x.shape[1]).to(x.dtype)
        pos_q = self.pos_embed.to(x.dtype)
        kv = self.ln_kv(self.kv_proj(x))
        q = (self.ln_q(self.query) + pos_q).unsqueeze(0).expand(x.shape[0], -1, -1)
        out, _ = self.attn(q, kv + pos_k, kv, need_weights=False)
        return self.ln_post(out) @ self.proj
