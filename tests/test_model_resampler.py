"""The resampler against a straightforward re-implementation of the reference formulas (section 1.3)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.config import ResamplerConfig
from models.resampler import Resampler, sincos_2d


def mae_sincos_2d(dim: int, grid_size: int) -> np.ndarray:
    """MAE-style 2D sin-cos, written the way the reference describes it: meshgrid(w, h), "w goes
    first"; half the channels from grid[0], half from grid[1]; numpy float64."""
    grid_h = np.arange(grid_size, dtype=np.float64)
    grid_w = np.arange(grid_size, dtype=np.float64)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, -1)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def reference_resampler(m: Resampler, x: torch.Tensor) -> torch.Tensor:
    """Plain float64 matmuls and softmax from the formulas, using the module's weights."""
    p = {k: v.detach().double() for k, v in m.state_dict().items()}
    x = x.double()
    n, d = p["query"].shape
    heads = d // m.cfg.head_dim
    eps = m.cfg.ln_eps
    pos_q = torch.from_numpy(mae_sincos_2d(d, int(n**0.5)))
    g_src, g_tgt = int(n**0.5), int(x.shape[1] ** 0.5)
    pos_k = (
        F.interpolate(
            pos_q.float().reshape(1, g_src, g_src, d).permute(0, 3, 1, 2),
            size=(g_tgt, g_tgt),
            mode="bicubic",
            align_corners=False,
        )
        .permute(0, 2, 3, 1)
        .reshape(-1, d)
        .double()
    )

    kv = layer_norm(x @ p["kv_proj.weight"].T, p["ln_kv.weight"], p["ln_kv.bias"], eps)
    q_in = layer_norm(p["query"], p["ln_q.weight"], p["ln_q.bias"], eps) + pos_q
    k_in, v_in = kv + pos_k, kv
    wq, wk, wv = p["attn.in_proj_weight"].chunk(3)
    bq, bk, bv = p["attn.in_proj_bias"].chunk(3)
    outs = []
    for b in range(x.shape[0]):
        q = (q_in @ wq.T + bq).reshape(n, heads, -1).transpose(0, 1)
        k = (k_in[b] @ wk.T + bk).reshape(-1, heads, d // heads).transpose(0, 1)
        v = (v_in[b] @ wv.T + bv).reshape(-1, heads, d // heads).transpose(0, 1)
        att = torch.softmax(q @ k.transpose(1, 2) / (d // heads) ** 0.5, dim=-1)
        o = (att @ v).transpose(0, 1).reshape(n, d) @ p["attn.out_proj.weight"].T + p["attn.out_proj.bias"]
        outs.append(layer_norm(o, p["ln_post.weight"], p["ln_post.bias"], eps) @ p["proj"])
    return torch.stack(outs)


def test_sincos_table_matches_the_mae_formula():
    for dim, grid in [(32, 4), (4096, 16)]:
        np.testing.assert_allclose(sincos_2d(dim, grid).numpy(), mae_sincos_2d(dim, grid), atol=1e-6, rtol=0)


def test_first_half_of_channels_encodes_the_column():
    table = sincos_2d(16, 4).reshape(4, 4, 16)  # [row, col, C]
    assert torch.equal(table[0, :, :8], table[3, :, :8])  # same column -> same first half
    assert torch.equal(table[:, 0, 8:], table[:, 3, 8:])  # same row -> same second half
    assert not torch.equal(table[0, 0, :8], table[0, 1, :8])


@pytest.mark.parametrize("num_patches", [36, 16])  # key positions resized 4x4 -> 6x6, and not resized
def test_resampler_matches_reference_formulas(num_patches):
    torch.manual_seed(0)
    m = Resampler(ResamplerConfig(num_queries=16, head_dim=8), kv_dim=24, dim=32)
    with torch.no_grad():  # non-trivial LayerNorm affine params so they are really exercised
        for ln in (m.ln_q, m.ln_kv, m.ln_post):
            ln.weight.normal_(1.0, 0.1)
            ln.bias.normal_(0.0, 0.1)
        m.attn.in_proj_bias.normal_(0.0, 0.1)
    x = torch.randn(2, num_patches, 24)
    out = m(x)
    assert out.shape == (2, 16, 32)
    torch.testing.assert_close(out.double(), reference_resampler(m, x), atol=2e-5, rtol=1e-4)


def test_pos_embed_is_a_saved_buffer_not_a_parameter():
    m = Resampler(ResamplerConfig(num_queries=16, head_dim=8), kv_dim=24, dim=32)
    assert "pos_embed" in m.state_dict()
    assert "pos_embed" not in dict(m.named_parameters())


def test_heads_follow_head_dim_and_reject_indivisible_width():
    m = Resampler(ResamplerConfig(num_queries=16, head_dim=8), kv_dim=24, dim=32)
    assert m.attn.num_heads == 4
    with pytest.raises(ValueError, match="head_dim"):
        Resampler(ResamplerConfig(num_queries=16, head_dim=12), kv_dim=24, dim=32)
