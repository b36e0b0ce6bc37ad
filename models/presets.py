"""Named model shapes: the Qwen-VL 7B shape and a tiny one for tests and demos."""

from __future__ import annotations

from models.config import ResamplerConfig, VisionConfig, VLMConfig


def qwen2_text_config(
    vocab_size: int,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    max_positions: int,
    rope_theta: float = 10000.0,
) -> dict:
    """A Hugging Face Qwen2 config dict (RMSNorm eps 1e-6, SwiGLU, untied embeddings, as Qwen-7B)."""
    return dict(
        model_type="qwen2",
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=False,
        hidden_act="silu",
    )


def qwen_vl_7b(vocab_size: int = 151936) -> VLMConfig:
    """ViT-bigG/14 at 448 px + 256-query resampler + a Qwen2-architecture decoder of the Qwen-7B shape.

    Qwen-7B's MLP is listed as intermediate_size 22016 in its own config (w1 and w2 together); the
    Qwen2 architecture counts one branch, hence 11008. The image token ids default to the Qwen-VL
    tokenizer's (reference 2.1); build_vlm(config, tokenizer) replaces them with the tokenizer's own.
    """
    return VLMConfig(
        vision=VisionConfig(
            image_size=448, patch_size=14, width=1664, layers=48, heads=16, mlp_dim=8192, pos_grid=16
        ),
        resampler=ResamplerConfig(num_queries=256, head_dim=128),
        text_config=qwen2_text_config(
            vocab_size, hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, max_positions=8192
        ),
        image_start_id=151857,
        image_end_id=151858,
        image_pad_id=151859,
        pad_token_id=151643,
    )


def tiny(vocab_size: int) -> VLMConfig:
    """A model of a few hundred thousand parameters for tests and demos.

    84 px images (6x6 patches) with a 4x4 position table and 16 queries (4x4), so both bicubic
    resizes of the full-scale model (pos table 16->32, resampler key positions 16->32) are exercised;
    vision width 96 != LLM width 64, so kv_proj really changes width.
    """
    return VLMConfig(
        vision=VisionConfig(
            image_size=84, patch_size=14, width=96, layers=2, heads=4, mlp_dim=192, pos_grid=4
        ),
        resampler=ResamplerConfig(num_queries=16, head_dim=16),
        text_config=qwen2_text_config(
            vocab_size, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, max_positions=1024
        ),
    )


def demo(vocab_size: int) -> VLMConfig:
    """The embedded demo's model (launch/demo.sh): a few million parameters,
    trained on 2 CPU cores in minutes.

    Like ``tiny`` (4x4 position table, 16 queries) but wide and deep enough to learn the synthetic
    world's captions, answers and boxes: vision width 128 with 3 blocks, a 4-layer LLM of width 160.
    Stage 1 runs at 56 px (4x4 patches = the position table, like 224 px on a 16x16 table at full
    scale) and stages 2-3 at 84 px (6x6 patches, the table resized bicubically, like 448 px).
    """
    return VLMConfig(
        vision=VisionConfig(
            image_size=56, patch_size=14, width=128, layers=3, heads=4, mlp_dim=512, pos_grid=4
        ),
        resampler=ResamplerConfig(num_queries=16, head_dim=32),
        text_config=qwen2_text_config(
            vocab_size, hidden=160, intermediate=480, layers=4, heads=5, kv_heads=5, max_positions=1024
        ),
    )


def small(vocab_size: int = 151936) -> VLMConfig:
    """A small-but-real VLM (~0.9B) for multi-GPU checks: a ViT-L/14-shaped tower at 448 px, the
    256-query resampler, and a Qwen2-0.5B-shaped decoder (the vocabulary follows the tokenizer)."""
    return VLMConfig(
        vision=VisionConfig(
            image_size=448, patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096, pos_grid=16
        ),
        resampler=ResamplerConfig(num_queries=256, head_dim=128),
        text_config=qwen2_text_config(
            vocab_size,
            hidden=896,
            intermediate=4864,
            layers=24,
            heads=14,
            kv_heads=2,
            max_positions=8192,
            rope_theta=1000000.0,
        ),
    )
