"""Specification of models.convert_qwenvl: an official Qwen-VL(-Chat) directory -> our VLM directory.

A tiny checkpoint is written with the exact QWen key names, layouts and config.json format (random
weights, small dims). After conversion our model's logits must equal those of the QWen block maths
re-implemented below, straight from the reference's description (fused c_attn split into q, k, v;
RoPE on slot indices, rotate-half; RMSNorm; c_proj(w1(x) * silu(w2(x))); a ViT whose in_proj rows
are interleaved per head; bicubic position resizing; the attn_pool resampler, ln_post and proj).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from models.convert_qwenvl import convert_qwenvl
from tests.conftest import TINY_NUM_RANKS, write_tiny_tiktoken

N_QUERIES = 256  # the reference's default: 256 <imgpad> slots per image
IMG, IMG_END, IMGPAD = (TINY_NUM_RANKS + offset for offset in (214, 215, 216))  # reference offsets
# Qwen-VL-Chat's generation_config.json
GENERATION_CONFIG = {
    "chat_format": "chatml",
    "eos_token_id": 151643,
    "pad_token_id": 151643,
    "max_window_size": 6144,
    "max_new_tokens": 512,
    "do_sample": True,
    "top_k": 0,
    "top_p": 0.3,
}


def tiny_qwen_config() -> dict:
    """A config.json in the QWen format (keys as in the release), tiny dims."""
    return {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "model_type": "qwen",
        "attn_dropout_prob": 0.0,
        "emb_dropout_prob": 0.0,
        "bf16": True,
        "hidden_size": 256,
        "intermediate_size": 192,  # w1 + w2 together: each is 96 wide
        "kv_channels": 64,
        "layer_norm_epsilon": 1e-6,
        "max_position_embeddings": 8192,
        "no_bias": True,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "scale_attn_weights": True,
        "seq_length": 2048,
        "tie_word_embeddings": False,
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "vocab_size": 512,
        "visual": {
            "heads": 4,
            "image_size": 56,
            "image_start_id": IMG,
            "layers": 2,
            "mlp_ratio": 2.0,
            "output_dim": 256,  # resampler heads = 256 // 128 = 2
            "patch_size": 14,
            "width": 64,
        },
    }


def tiny_qwen_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the exact QWen key names and shapes."""
    g = torch.Generator().manual_seed(seed)
    d, v, layers = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    ff = cfg["intermediate_size"] // 2
    vis = cfg["visual"]
    w, p = vis["width"], vis["patch_size"]
    mlp = int(w * vis["mlp_ratio"])

    def lin(out_dim: int, in_dim: int) -> torch.Tensor:
        return torch.randn(out_dim, in_dim, generator=g) * in_dim**-0.5

    def vec(n: int, mean: float = 0.0) -> torch.Tensor:
        return mean + 0.1 * torch.randn(n, generator=g)

    sd = {"transformer.wte.weight": torch.randn(v, d, generator=g), "lm_head.weight": lin(v, d)}
    for i in range(layers):
        h = f"transformer.h.{i}."
        sd |= {
            h + "ln_1.weight": vec(d, 1.0),
            h + "ln_2.weight": vec(d, 1.0),
            h + "attn.c_attn.weight": lin(3 * d, d),
            h + "attn.c_attn.bias": vec(3 * d),
            h + "attn.c_proj.weight": lin(d, d),
            h + "mlp.w1.weight": lin(ff, d),
            h + "mlp.w2.weight": lin(ff, d),
            h + "mlp.c_proj.weight": lin(d, ff),
        }
    sd["transformer.ln_f.weight"] = vec(d, 1.0)
    V = "transformer.visual."
    sd |= {
        V + "conv1.weight": torch.randn(w, 3, p, p, generator=g) * (3 * p * p) ** -0.5,
        V + "positional_embedding": torch.randn(256, w, generator=g) * w**-0.5,
        V + "ln_pre.weight": vec(w, 1.0),
        V + "ln_pre.bias": vec(w),
    }
    for i in range(vis["layers"]):
        b = f"{V}transformer.resblocks.{i}."
        sd |= {
            b + "ln_1.weight": vec(w, 1.0),
            b + "ln_1.bias": vec(w),
            b + "attn.in_proj.weight": lin(3 * w, w),
            b + "attn.in_proj.bias": vec(3 * w),
            b + "attn.out_proj.weight": lin(w, w),
            b + "attn.out_proj.bias": vec(w),
            b + "ln_2.weight": vec(w, 1.0),
            b + "ln_2.bias": vec(w),
            b + "mlp.c_fc.weight": lin(mlp, w),
            b + "mlp.c_fc.bias": vec(mlp),
            b + "mlp.c_proj.weight": lin(w, mlp),
            b + "mlp.c_proj.bias": vec(w),
        }
    A = V + "attn_pool."
    sd |= {
        A + "query": torch.randn(N_QUERIES, d, generator=g),
        # Not the sin-cos table our resampler would compute: the converter must keep stored values.
        A + "pos_embed": torch.randn(N_QUERIES, d, generator=g) * 0.5,
        A + "kv_proj.weight": lin(d, w),
        A + "ln_q.weight": vec(d, 1.0),
        A + "ln_q.bias": vec(d),
        A + "ln_kv.weight": vec(d, 1.0),
        A + "ln_kv.bias": vec(d),
        A + "attn.in_proj_weight": lin(3 * d, d),
        A + "attn.in_proj_bias": vec(3 * d),
        A + "attn.out_proj.weight": lin(d, d),
        A + "attn.out_proj.bias": vec(d),
        V + "ln_post.weight": vec(d, 1.0),
        V + "ln_post.bias": vec(d),
        V + "proj": torch.randn(d, d, generator=g) * d**-0.5,
    }
    return sd


def write_qwen_dir(path, cfg: dict, sd: dict[str, torch.Tensor], fmt: str = "bin", shards: int = 2):
    """A Qwen-VL HF directory: config.json, sharded weights with an index json, qwen.tiktoken."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    write_tiny_tiktoken(path / "qwen.tiktoken")
    keys = list(sd)
    per_shard = math.ceil(len(keys) / shards)
    weight_map = {}
    for s in range(shards):
        part = {k: sd[k].contiguous() for k in keys[s * per_shard : (s + 1) * per_shard]}
        if fmt == "bin":
            name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
            torch.save(part, path / name)
        else:
            from safetensors.torch import save_file

            name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, str(path / name))
        weight_map |= {k: name for k in part}
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (path / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


# ------------------------------------------------------------------------------------------------
# The reference's maths, written out directly from its description (no code shared with models/).
# ------------------------------------------------------------------------------------------------


def get_abs_pos(table: torch.Tensor, tgt_len: int) -> torch.Tensor:
    src, tgt = int(math.sqrt(table.shape[0])), int(math.sqrt(tgt_len))
    if src == tgt:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


def ln(x, sd, name, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def attention(q, k, v, causal=False):
    """q, k, v [B, heads, L, hd] -> [B, L, heads * hd]."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        L = q.shape[2]
        scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).flatten(2)


def reference_visual(sd, cfg, images):
    vis, V = cfg["visual"], "transformer.visual."
    width, heads = vis["width"], vis["heads"]
    hn = width // heads
    x = F.conv2d(images, sd[V + "conv1.weight"], stride=vis["patch_size"])
    x = x.flatten(2).transpose(1, 2)  # [B, N, width], no class token
    x = x + get_abs_pos(sd[V + "positional_embedding"], x.shape[1])
    x = ln(x, sd, V + "ln_pre")
    B, N, _ = x.shape
    for i in range(vis["layers"]):
        b = f"{V}transformer.resblocks.{i}."
        h = ln(x, sd, b + "ln_1")
        mixed = h @ sd[b + "attn.in_proj.weight"].T + sd[b + "attn.in_proj.bias"]
        # VisualAttention: view as [.., heads, 3 * hn], then split the last dim into q, k, v
        q, k, v = mixed.view(B, N, heads, 3 * hn).split(hn, dim=-1)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + out @ sd[b + "attn.out_proj.weight"].T + sd[b + "attn.out_proj.bias"]
        h = ln(x, sd, b + "ln_2")
        h = F.gelu(h @ sd[b + "mlp.c_fc.weight"].T + sd[b + "mlp.c_fc.bias"])
        x = x + h @ sd[b + "mlp.c_proj.weight"].T + sd[b + "mlp.c_proj.bias"]
    # attn_pool (Resampler)
    A = V + "attn_pool."
    d = vis["output_dim"]
    heads_q, hd = d // 128, 128
    kv = ln(x @ sd[A + "kv_proj.weight"].T, sd, A + "ln_kv")
    query = ln(sd[A + "query"], sd, A + "ln_q").expand(B, -1, -1)
    q_in = query + sd[A + "pos_embed"]
    k_in = kv + get_abs_pos(sd[A + "pos_embed"], N)
    wq, wk, wv = sd[A + "attn.in_proj_weight"].chunk(3)
    bq, bk, bv = sd[A + "attn.in_proj_bias"].chunk(3)

    def heads_of(t):
        return t.view(B, t.shape[1], heads_q, hd).transpose(1, 2)

    out = attention(heads_of(q_in @ wq.T + bq), heads_of(k_in @ wk.T + bk), heads_of(kv @ wv.T + bv))
    out = out @ sd[A + "attn.out_proj.weight"].T + sd[A + "attn.out_proj.bias"]
    return ln(out, sd, V + "ln_post") @ sd[V + "proj"]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def reference_logits(sd, cfg, input_ids, images):
    d, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    hd, eps = cfg["kv_channels"], cfg["layer_norm_epsilon"]
    B, L = input_ids.shape
    h = sd["transformer.wte.weight"][input_ids].clone()
    # QWenModel.forward: features overwrite the positions strictly between <img> and </img>
    feats = reference_visual(sd, cfg, images)
    k = 0
    for row in range(B):
        starts = (input_ids[row] == IMG).nonzero().flatten().tolist()
        ends = (input_ids[row] == IMG_END).nonzero().flatten().tolist()
        for a, b in zip(starts, ends, strict=True):
            h[row, a + 1 : b] = feats[k]
            k += 1
    # RoPE on slot indices 0..L-1 (the reference ignores position_ids), rotate-half on the full head
    inv_freq = 1.0 / cfg["rotary_emb_base"] ** (torch.arange(0, hd, 2).float() / hd)
    freqs = torch.outer(torch.arange(L).float(), inv_freq)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        x = rms(h, sd[p + "ln_1.weight"], eps)
        mixed = x @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]
        q, k_, v = (t.view(B, L, nh, hd).transpose(1, 2) for t in mixed.split(d, dim=2))
        q, k_ = q * cos + rotate_half(q) * sin, k_ * cos + rotate_half(k_) * sin
        h = h + attention(q, k_, v, causal=True) @ sd[p + "attn.c_proj.weight"].T
        x = rms(h, sd[p + "ln_2.weight"], eps)
        a1, a2 = x @ sd[p + "mlp.w1.weight"].T, x @ sd[p + "mlp.w2.weight"].T
        h = h + (a1 * F.silu(a2)) @ sd[p + "mlp.c_proj.weight"].T
    return rms(h, sd["transformer.ln_f.weight"], eps) @ sd["lm_head.weight"].T


# ------------------------------------------------------------------------------------------------


def one_image_input(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    before = torch.randint(0, TINY_NUM_RANKS, (5,), generator=g)
    after = torch.randint(0, TINY_NUM_RANKS, (7,), generator=g)
    ids = torch.cat(
        [before, torch.tensor([IMG]), torch.full((N_QUERIES,), IMGPAD), torch.tensor([IMG_END]), after]
    )
    images = torch.randn(1, 3, 56, 56, generator=g)
    return ids[None], images


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory):
    cfg = tiny_qwen_config()
    sd = tiny_qwen_state_dict(cfg)
    return write_qwen_dir(tmp_path_factory.mktemp("Qwen-VL-Chat"), cfg, sd), cfg, sd


@pytest.fixture(scope="module")
def converted_fp32(qwen_checkpoint, tmp_path_factory):
    from models import load_vlm

    src, _, _ = qwen_checkpoint
    out = tmp_path_factory.mktemp("converted")
    convert_qwenvl(src, out, dtype=torch.float32)
    return load_vlm(out, dtype=torch.float32).eval()


def test_converted_logits_equal_the_reference_qwen_maths(qwen_checkpoint, converted_fp32):
    _, cfg, sd = qwen_checkpoint
    input_ids, images = one_image_input()
    with torch.no_grad():
        ours = converted_fp32(input_ids, pixel_values=images).logits
        expected = reference_logits(sd, cfg, input_ids, images)
    assert expected.std() > 0.5, "the fixture must produce non-trivial logits"
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_the_image_changes_the_logits_after_its_span(qwen_checkpoint, converted_fp32):
    # Guards the test above against an image path that contributes nothing.
    input_ids, images = one_image_input()
    with torch.no_grad():
        a = converted_fp32(input_ids, pixel_values=images).logits[0, -1]
        b = converted_fp32(input_ids, pixel_values=images.flip(-1)).logits[0, -1]
    assert (a - b).abs().max() > 1e-2


def test_converted_config_and_tokenizer(converted_fp32):
    cfg = converted_fp32.config
    assert cfg.text_config["model_type"] == "qwen2"
    assert cfg.text_config["intermediate_size"] == 96  # one SwiGLU branch
    assert cfg.text_config["vocab_size"] == 512  # embedding rows kept, not shrunk to the tokenizer
    assert (cfg.image_start_id, cfg.image_end_id, cfg.image_pad_id) == (IMG, IMG_END, IMGPAD)
    assert cfg.pad_token_id == TINY_NUM_RANKS  # <|endoftext|>
    assert cfg.num_image_tokens == N_QUERIES and cfg.vision.pos_grid == 16
    assert not cfg.train_embeddings
    tok = converted_fp32.tokenizer
    assert tok is not None and tok.convert_tokens_to_ids("<imgpad>") == IMGPAD


def test_generation_config_is_kept_so_the_chat_format_is_known(qwen_checkpoint, tmp_path):
    from eval_mm.prompts import checkpoint_prompt_format

    src, _, _ = qwen_checkpoint
    convert_qwenvl(src, tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text()) == GENERATION_CONFIG
    assert checkpoint_prompt_format(tmp_path) == "chatml"


def test_the_released_config_gives_exactly_the_released_parameter_count():
    """Qwen-VL-Chat's config.json (reference 1.1) on the meta device: our model must hold exactly the
    19,313,870,336 bf16 bytes of the release's pytorch_model.bin.index.json, with the reference's shapes."""
    from pathlib import Path

    from models import build_vlm
    from models.convert_qwenvl import vlm_config_from_qwen

    released = {
        **tiny_qwen_config(),
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "kv_channels": 128,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "vocab_size": 151936,
        "visual": {
            "heads": 16,
            "image_size": 448,
            "image_start_id": 151857,
            "layers": 48,
            "mlp_ratio": 4.9231,
            "output_dim": 4096,
            "patch_size": 14,
            "width": 1664,
        },
    }
    ids = {"<img>": 151857, "</img>": 151858, "<imgpad>": 151859, "<|endoftext|>": 151643}
    cfg = vlm_config_from_qwen(released, Path("config.json"), ids)
    shapes = {
        k: tuple(t.shape) for k, t in build_vlm(cfg, device="meta", init_weights=False).state_dict().items()
    }
    assert sum(math.prod(s) for s in shapes.values()) * 2 == 19_313_870_336
    assert shapes["vision.blocks.47.mlp.fc1.weight"] == (8192, 1664)
    assert shapes["vision.pos_embed"] == (256, 1664)
    assert shapes["resampler.kv_proj.weight"] == (4096, 1664)
    assert shapes["llm.model.layers.31.mlp.gate_proj.weight"] == (11008, 4096)
    assert shapes["llm.lm_head.weight"] == (151936, 4096)


def test_safetensors_shards_convert_to_the_same_weights(qwen_checkpoint, converted_fp32, tmp_path):
    from models import load_vlm

    _, cfg, sd = qwen_checkpoint
    src = write_qwen_dir(tmp_path / "src", cfg, sd, fmt="safetensors", shards=3)
    convert_qwenvl(src, tmp_path / "out", dtype=torch.float32)
    other = load_vlm(tmp_path / "out", dtype=torch.float32)
    ours = converted_fp32.state_dict()
    for name, tensor in other.state_dict().items():
        torch.testing.assert_close(tensor, ours[name], rtol=0, atol=0, msg=name)


def test_default_dtype_is_bfloat16(qwen_checkpoint, tmp_path):
    from safetensors import safe_open

    src, _, _ = qwen_checkpoint
    convert_qwenvl(src, tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert files
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"BF16"}


def test_resampler_keeps_the_stored_pos_embed(qwen_checkpoint, converted_fp32):
    _, _, sd = qwen_checkpoint
    torch.testing.assert_close(
        converted_fp32.resampler.pos_embed, sd["transformer.visual.attn_pool.pos_embed"]
    )


def test_cli_converts(qwen_checkpoint, tmp_path):
    from models.convert_qwenvl import main

    src, _, _ = qwen_checkpoint
    main([str(src), str(tmp_path / "out"), "--dtype", "float32"])
    assert (tmp_path / "out" / "config.json").is_file()
    assert (tmp_path / "out" / "tokenizer.json").is_file()


# ------------------------------------------------------------------------------------------------
# Refusals


def test_unexpected_keys_are_refused_with_a_list(qwen_checkpoint, tmp_path):
    _, cfg, sd = qwen_checkpoint
    extra = dict(sd)
    extra["transformer.h.0.attn.c_attn.qweight"] = torch.zeros(2)
    extra["transformer.visual.extra_head.weight"] = torch.zeros(2)
    src = write_qwen_dir(tmp_path / "src", cfg, extra)
    with pytest.raises(ValueError, match="2 unexpected") as err:
        convert_qwenvl(src, tmp_path / "out")
    assert "transformer.h.0.attn.c_attn.qweight" in str(err.value)
    assert "transformer.visual.extra_head.weight" in str(err.value)


def test_missing_keys_are_refused_with_a_list(qwen_checkpoint, tmp_path):
    _, cfg, sd = qwen_checkpoint
    partial = {
        k: v for k, v in sd.items() if k not in ("transformer.visual.attn_pool.query", "lm_head.weight")
    }
    src = write_qwen_dir(tmp_path / "src", cfg, partial)
    with pytest.raises(ValueError, match="lacks 2 of our parameters") as err:
        convert_qwenvl(src, tmp_path / "out")
    assert "resampler.query" in str(err.value) and "llm.lm_head.weight" in str(err.value)


def test_shapes_that_disagree_with_the_config_are_refused(qwen_checkpoint, tmp_path):
    _, cfg, sd = qwen_checkpoint
    bad = dict(sd)
    bad["transformer.h.1.mlp.w2.weight"] = torch.zeros(64, cfg["hidden_size"])
    src = write_qwen_dir(tmp_path / "src", cfg, bad)
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.w2\.weight has shape \(64, 256\)"):
        convert_qwenvl(src, tmp_path / "out")


def test_rotary_inv_freq_entries_are_skipped(qwen_checkpoint, tmp_path):
    _, cfg, sd = qwen_checkpoint
    with_buffer = dict(sd)
    with_buffer["transformer.rotary_emb.inv_freq"] = torch.zeros(32)
    convert_qwenvl(write_qwen_dir(tmp_path / "src", cfg, with_buffer), tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"quantization_config": {"quant_method": "gptq"}}, "quantised"),
        ({"rotary_pct": 0.5}, "partial RoPE"),
        ({"no_bias": False}, "no_bias"),
        ({"model_type": "llama"}, "not a Qwen-VL config"),
    ],
)
def test_configs_we_cannot_express_are_refused(qwen_checkpoint, tmp_path, change, message):
    _, cfg, sd = qwen_checkpoint
    src = write_qwen_dir(tmp_path / "src", {**cfg, **change}, sd, shards=1)
    with pytest.raises(ValueError, match=message):
        convert_qwenvl(src, tmp_path / "out")


def test_a_wrong_image_start_id_is_refused(qwen_checkpoint, tmp_path):
    _, cfg, sd = qwen_checkpoint
    bad = {**cfg, "visual": {**cfg["visual"], "image_start_id": 151857}}
    src = write_qwen_dir(tmp_path / "src", bad, sd, shards=1)
    with pytest.raises(ValueError, match="image_start_id"):
        convert_qwenvl(src, tmp_path / "out")
