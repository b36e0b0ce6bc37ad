"""Construction: full-scale shapes on the meta device, special tokens, local LLM loading, config JSON."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from models import VLMConfig, build_vlm, presets
from models.build import text_config_from_dict
from models.tokens import VLM_SPECIAL_TOKENS, ensure_special_tokens


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def full_scale(tiny_tokenizer):
    return build_vlm(presets.qwen_vl_7b(), tokenizer=tiny_tokenizer, device="meta")


def test_full_scale_parameter_counts(full_scale):
    assert count(full_scale.vision) == pytest.approx(1.84e9, rel=0.01)
    assert count(full_scale.resampler) == pytest.approx(
        0.09e9, rel=0.03
    )  # 0.0918 B; reference rounds to 0.09
    assert count(full_scale.llm) == pytest.approx(7.7e9, rel=0.01)
    assert all(p.is_meta for p in full_scale.parameters())


def test_full_scale_shapes(full_scale):
    v, r, llm = full_scale.vision, full_scale.resampler, full_scale.llm
    assert v.patch_embed.weight.shape == (1664, 3, 14, 14) and v.patch_embed.bias is None
    assert v.pos_embed.shape == (256, 1664)
    assert len(v.blocks) == 48 and v.blocks[0].attn.qkv.weight.shape == (3 * 1664, 1664)
    assert v.blocks[0].mlp.fc1.weight.shape == (8192, 1664)
    assert r.query.shape == (256, 4096) and r.pos_embed.shape == (256, 4096)
    assert r.kv_proj.weight.shape == (4096, 1664) and r.kv_proj.bias is None
    assert r.attn.num_heads == 32 and r.proj.shape == (4096, 4096)
    assert llm.config.num_hidden_layers == 32 and llm.config.intermediate_size == 11008
    assert llm.get_input_embeddings().weight.shape == (151936, 4096)
    assert not llm.config.tie_word_embeddings
    assert llm.config._attn_implementation == "sdpa"


def test_full_scale_image_features_on_meta(full_scale):
    features = full_scale.encode_images(torch.empty(2, 3, 448, 448, device="meta"))
    assert features.shape == (2, 256, 4096)
    assert full_scale.vision(torch.empty(1, 3, 448, 448, device="meta")).shape == (1, 1024, 1664)


def test_build_records_image_token_ids(tiny_vlm, tiny_tokenizer):
    cfg = tiny_vlm.config
    vocab = tiny_tokenizer.get_vocab()
    assert (cfg.image_start_id, cfg.image_end_id, cfg.image_pad_id) == (
        vocab["<img>"],
        vocab["</img>"],
        vocab["<imgpad>"],
    )
    assert cfg.pad_token_id == tiny_tokenizer.pad_token_id
    assert not cfg.train_embeddings  # the fixture tokenizer already had every special token


def test_base_tokenizer_gets_special_tokens_and_model_trains_embeddings(tmp_path):
    """A base LLM directory whose tokenizer lacks the VLM tokens: tokens added, embeddings resized."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(
        ["hello world the cat sat on the mat"],
        trainers.BpeTrainer(
            vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    base_tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    base_len = len(base_tok)
    llm = AutoModelForCausalLM.from_config(text_config_from_dict({**presets.tiny(base_len).text_config}))
    llm.save_pretrained(tmp_path / "llm")

    vlm = build_vlm(presets.tiny(vocab_size=10), tokenizer=base_tok, llm_path=tmp_path / "llm")
    assert len(base_tok) == base_len + len(VLM_SPECIAL_TOKENS) + 1  # + <|endoftext|> as pad
    assert base_tok.pad_token == "<|endoftext|>"
    assert vlm.config.train_embeddings
    assert vlm.llm.get_input_embeddings().num_embeddings == len(base_tok)
    assert vlm.config.text_config["vocab_size"] == len(base_tok)  # the LLM directory's config, resized
    torch.testing.assert_close(  # the loaded weights, not a random init
        vlm.llm.model.layers[0].mlp.up_proj.weight, llm.model.layers[0].mlp.up_proj.weight
    )
    assert ensure_special_tokens(base_tok) == []  # idempotent
    assert base_tok.convert_ids_to_tokens(base_tok("<img><imgpad></img>")["input_ids"]) == [
        "<img>",
        "<imgpad>",
        "</img>",
    ]


def test_config_json_round_trip(tmp_path, tiny_vlm):
    path = tmp_path / "config.json"
    tiny_vlm.config.save(path)
    loaded = VLMConfig.load(path)
    assert loaded == tiny_vlm.config
    assert json.loads(path.read_text())["vision"]["width"] == tiny_vlm.config.vision.width


def test_bad_config_file_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"vision": {"width": 8}, "mystery": 1}))
    with pytest.raises(ValueError, match=str(path)):
        VLMConfig.load(path)


def test_dtype_applies_to_every_part(tiny_tokenizer):
    vlm = build_vlm(presets.tiny(len(tiny_tokenizer)), tokenizer=tiny_tokenizer, dtype=torch.bfloat16)
    assert {p.dtype for p in vlm.parameters()} == {torch.bfloat16}
