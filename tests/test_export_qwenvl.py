"""Specification of models.export_qwenvl: our VLM directory -> the released Qwen-VL(-Chat) layout.

The source is a tiny model of the release's architecture with every weight randomised. What the
export writes must (1) convert back with models.convert_qwenvl to the same weights bit for bit and to
the same tokenizer, and (2) give, under the QWen maths re-implemented independently in
tests/test_convert_qwenvl.py (straight from the reference's description, no code shared with models/),
the logits our model gives on the source. A tiny checkpoint in the release's own layout must come back
unchanged through convert -> export. Models the release cannot express are refused with one line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# The released-layout fixtures and the independent QWen maths live beside the converter's tests.
from test_convert_qwenvl import (
    GENERATION_CONFIG,
    IMG,
    one_image_input,
    reference_logits,
    tiny_qwen_config,
    tiny_qwen_state_dict,
    write_qwen_dir,
)

from models import build_vlm, load_vlm
from models.convert_qwenvl import convert_qwenvl, vlm_config_from_qwen
from models.errors import UserError
from models.export_qwenvl import check_exportable, export_qwenvl, export_vlm, mlp_ratio_for
from models.qwen_tokenizer import build_qwen_tokenizer
from tests.conftest import TINY_NUM_RANKS, write_tiny_tiktoken

SAMPLE_TEXTS = [
    "Describe the image in English: the cat sleeps.",
    "<|im_start|>user\nPicture 1: <img>/data/猫.jpg</img>\nwhere is <ref>the cat</ref>?<|im_end|>\n"
    "<|im_start|>assistant\n<ref>the cat</ref><box>(12,345),(678,999)</box><|im_end|><|endoftext|>",
    "<imgpad><imgpad><quad></quad><|extra_7|>ing the th\u00e5",
]


def read_release_dir(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and every tensor of an exported directory (all shards of its index, or the one file)."""
    config = json.loads((path / "config.json").read_text())
    if not (path / "model.safetensors.index.json").exists():
        return config, load_file(path / "model.safetensors")
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index.values())):
        tensors |= load_file(path / shard)
    assert set(tensors) == set(index)
    return config, tensors


@pytest.fixture(scope="module")
def qwen_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "qwen.tiktoken"
    write_tiny_tiktoken(path)
    return build_qwen_tokenizer(path)


def qwen_architecture_config(qwen_tokenizer, **qwen_overrides):
    """Our VLMConfig for the tiny release-architecture config of test_convert_qwenvl (256 queries,
    16x16 position table, resampler heads of 128)."""
    vocab = qwen_tokenizer.get_vocab()
    ids = {t: vocab[t] for t in ("<img>", "</img>", "<imgpad>", "<|endoftext|>")}
    return vlm_config_from_qwen({**tiny_qwen_config(), **qwen_overrides}, Path("config.json"), ids)


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Perturb every saved tensor (norm weights, biases, the resampler's sin-cos table included), so a
    swapped or misplaced tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(0.05 * torch.randn(tensor.shape, generator=g))


@pytest.fixture(scope="module")
def source(qwen_tokenizer):
    model = build_vlm(qwen_architecture_config(qwen_tokenizer), tokenizer=qwen_tokenizer)
    randomise(model)
    return model.eval()


@pytest.fixture(scope="module")
def source_dir(source, tmp_path_factory):
    path = tmp_path_factory.mktemp("source")
    source.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"chat_format": "chatml", "stage": "sft"}))
    return path


@pytest.fixture(scope="module")
def exported(source_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "qwen-vl"
    export_qwenvl(source_dir, out, dtype=torch.float32, max_shard_size="2MB")  # several shards
    return out


# ------------------------------------------------------------------------------------------------
# The round trips


def test_export_then_convert_gives_back_the_same_weights(source, exported, tmp_path):
    convert_qwenvl(exported, tmp_path, dtype=torch.float32)
    back = load_vlm(tmp_path, dtype=torch.float32)
    ours, theirs = source.state_dict(), back.state_dict()
    assert set(theirs) == set(ours)
    for name, tensor in ours.items():
        assert theirs[name].dtype == tensor.dtype, name
        assert torch.equal(theirs[name], tensor), name
    assert back.config.vision == source.config.vision and back.config.resampler == source.config.resampler
    for key in ("image_start_id", "image_end_id", "image_pad_id", "pad_token_id"):
        assert getattr(back.config, key) == getattr(source.config, key), key
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "rope_parameters",
        "max_position_embeddings",
    ):
        assert back.config.text_config[key] == source.config.text_config[key], key


def test_export_then_convert_gives_back_the_same_tokenizer(source, exported, tmp_path):
    convert_qwenvl(exported, tmp_path, dtype=torch.float32)
    back = load_vlm(tmp_path).tokenizer
    assert back.get_vocab() == source.tokenizer.get_vocab()
    for text in SAMPLE_TEXTS:
        ids = source.tokenizer.encode(text, add_special_tokens=False)
        assert back.encode(text, add_special_tokens=False) == ids
        assert back.decode(ids) == source.tokenizer.decode(ids)
    # the special tokens are single tokens at the release's ids
    assert back.encode("<img><imgpad></img>", add_special_tokens=False) == [IMG, IMG + 2, IMG + 1]


def test_the_release_maths_on_the_exported_files_gives_our_logits(source, exported):
    config, tensors = read_release_dir(exported)
    input_ids, images = one_image_input()
    with torch.no_grad():
        ours = source(input_ids, pixel_values=images).logits
        expected = reference_logits(tensors, config, input_ids, images)
    assert expected.std() > 0.1, "the fixture must produce non-trivial logits"
    torch.testing.assert_close(expected, ours, atol=1e-4, rtol=1e-4)


def test_a_released_checkpoint_survives_convert_then_export(tmp_path):
    """The release's own files -> ours -> the release's: every tensor, the vocabulary and the configs."""
    cfg, sd = tiny_qwen_config(), tiny_qwen_state_dict(tiny_qwen_config(), seed=3)
    release = write_qwen_dir(tmp_path / "Qwen-VL-Chat", cfg, sd, fmt="bin", shards=3)
    convert_qwenvl(release, tmp_path / "ours", dtype=torch.float32)
    export_qwenvl(
        tmp_path / "ours", tmp_path / "again", dtype=torch.float32, dynamic_ntk=True, max_shard_size="2MB"
    )

    config, tensors = read_release_dir(tmp_path / "again")
    assert set(tensors) == set(sd)
    for key, tensor in sd.items():
        assert torch.equal(tensors[key], tensor), key
    assert (tmp_path / "again" / "qwen.tiktoken").read_bytes() == (release / "qwen.tiktoken").read_bytes()
    # eos = pad = this vocabulary's <|endoftext|> (the fixture file copies the full-size release's ids)
    assert json.loads((tmp_path / "again" / "generation_config.json").read_text()) == {
        **GENERATION_CONFIG,
        "eos_token_id": TINY_NUM_RANKS,
        "pad_token_id": TINY_NUM_RANKS,
    }
    # Every key of the release's config.json comes back with its value; the precision flags follow
    # the export's dtype (float32 here), auto_map also names the release's configuration class, and
    # visual spells out n_queries (256, the release's default).
    for key, value in cfg.items():
        if key not in ("bf16", "auto_map", "visual"):
            assert config[key] == value, key
    assert config["visual"] == {**cfg["visual"], "n_queries": 256}
    assert (config["bf16"], config["fp16"], config["fp32"], config["torch_dtype"]) == (
        False,
        False,
        True,
        "float32",
    )


# ------------------------------------------------------------------------------------------------
# What is written


def test_the_written_files_and_config_keys_are_the_releases(exported):
    files = {p.name for p in exported.iterdir()}
    shards = {f for f in files if f.endswith(".safetensors")}
    assert len(shards) > 1 and all(f.startswith("model-") for f in shards)
    assert files - shards == {
        "config.json",
        "model.safetensors.index.json",
        "qwen.tiktoken",
        "tokenizer_config.json",
        "generation_config.json",
    }
    config, tensors = read_release_dir(exported)
    assert set(tensors) == set(tiny_qwen_state_dict(tiny_qwen_config()))  # the release's names, no more
    # Qwen-VL-Chat-Int4's config.json keys, less its quantisation and the writer's transformers version
    release_keys = {
        "architectures",
        "attn_dropout_prob",
        "auto_map",
        "bf16",
        "emb_dropout_prob",
        "fp16",
        "fp32",
        "hidden_size",
        "initializer_range",
        "intermediate_size",
        "kv_channels",
        "layer_norm_epsilon",
        "max_position_embeddings",
        "model_type",
        "no_bias",
        "num_attention_heads",
        "num_hidden_layers",
        "onnx_safe",
        "rotary_emb_base",
        "rotary_pct",
        "scale_attn_weights",
        "seq_length",
        "tie_word_embeddings",
        "tokenizer_type",
        "torch_dtype",
        "use_cache",
        "use_dynamic_ntk",
        "use_flash_attn",
        "use_logn_attn",
        "visual",
        "vocab_size",
    }
    assert set(config) == release_keys
    assert config["visual"] == {**tiny_qwen_config()["visual"], "n_queries": 256}
    assert config["intermediate_size"] == tiny_qwen_config()["intermediate_size"]  # w1 + w2, twice ours
    # Off by default: the release then computes exactly what our model does at every length.
    assert config["use_dynamic_ntk"] is False and config["use_logn_attn"] is False
    tokenizer_config = json.loads((exported / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "QWenTokenizer"
    assert tokenizer_config["auto_map"]["AutoTokenizer"][0] == "tokenization_qwen.QWenTokenizer"
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["chat_format"] == "chatml"
    assert generation["eos_token_id"] == generation["pad_token_id"] == TINY_NUM_RANKS  # <|endoftext|>
    assert generation["top_p"] == 0.3 and generation["max_window_size"] == 6144  # Qwen-VL-Chat's defaults


def test_the_7b_preset_gives_the_released_config_json():
    """Our full-size preset (Qwen-VL's shapes) written as the release's config.json: the values of
    Qwen-VL-Chat's own (reference 1.1; --dynamic-ntk gives its long-context settings)."""
    from models import presets
    from models.build import text_config_from_dict
    from models.export_qwenvl import release_config

    cfg = presets.qwen_vl_7b()
    config = release_config(cfg, text_config_from_dict(cfg.text_config), torch.bfloat16, dynamic_ntk=True)
    released = {
        "architectures": ["QWenLMHeadModel"],
        "attn_dropout_prob": 0.0,
        "emb_dropout_prob": 0.0,
        "bf16": True,
        "fp16": False,
        "fp32": False,
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 22016,
        "kv_channels": 128,
        "layer_norm_epsilon": 1e-6,
        "max_position_embeddings": 8192,
        "model_type": "qwen",
        "no_bias": True,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "onnx_safe": None,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "scale_attn_weights": True,
        "seq_length": 2048,
        "tie_word_embeddings": False,
        "tokenizer_type": "QWenTokenizer",
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_dynamic_ntk": True,
        "use_flash_attn": "auto",
        "use_logn_attn": True,
        "vocab_size": 151936,
        "visual": {
            "heads": 16,
            "image_size": 448,
            "image_start_id": 151857,
            "layers": 48,
            "mlp_ratio": 4.9231,
            "n_queries": 256,
            "output_dim": 4096,
            "patch_size": 14,
            "width": 1664,
        },
    }
    assert {k: v for k, v in config.items() if k != "auto_map"} == released


def test_a_source_without_chat_format_is_exported_as_a_raw_model(source, tmp_path):
    export_vlm(source, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["chat_format"] == "raw"


def test_mlp_ratio_gives_back_the_mlp_width_as_the_release_computes_it():
    assert mlp_ratio_for(1664, 8192) == 4.9231  # Qwen-VL-Chat's own value
    for width in range(8, 400, 7):
        for mlp_dim in range(width, 6 * width, 13):
            assert int(width * mlp_ratio_for(width, mlp_dim)) == mlp_dim, (width, mlp_dim)


def test_cli_exports_in_bfloat16_by_default(source, source_dir, tmp_path):
    from models.export_qwenvl import main

    main([str(source_dir), str(tmp_path / "out")])
    config, tensors = read_release_dir(tmp_path / "out")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert config["bf16"] and config["torch_dtype"] == "bfloat16"
    convert_qwenvl(tmp_path / "out", tmp_path / "back")  # bfloat16 too
    back = load_vlm(tmp_path / "back", dtype=torch.bfloat16).state_dict()
    for name, tensor in source.state_dict().items():
        assert torch.equal(back[name], tensor.to(torch.bfloat16)), name


def test_code_from_copies_the_releases_python_files(source_dir, tmp_path):
    release = tmp_path / "Qwen-VL-Chat"
    release.mkdir()
    for name in ("modeling_qwen.py", "visual.py", "tokenization_qwen.py", "LICENSE", "NOTICE"):
        (release / name).write_text(f"# {name}\n")
    (release / "pytorch_model-00001-of-00010.bin").write_bytes(b"weights are not copied")
    export_qwenvl(source_dir, tmp_path / "out", dtype=torch.float32, code_from=release)
    for name in ("modeling_qwen.py", "visual.py", "tokenization_qwen.py", "LICENSE", "NOTICE"):
        assert (tmp_path / "out" / name).read_text() == f"# {name}\n"
    assert not (tmp_path / "out" / "pytorch_model-00001-of-00010.bin").exists()


# ------------------------------------------------------------------------------------------------
# Refusals: one line saying why, nothing written


def _text_variant(qwen_tokenizer, **text_overrides):
    cfg = qwen_architecture_config(qwen_tokenizer)
    cfg.text_config = {**cfg.text_config, **text_overrides}
    return cfg


REFUSED = {
    "no q/k/v biases": lambda tok: _text_variant(tok, model_type="llama", attention_bias=False),
    "tied input/output embeddings": lambda tok: _text_variant(tok, tie_word_embeddings=True),
    "grouped-query attention": lambda tok: _text_variant(tok, num_key_value_heads=2),
    "LayerNorm norms": lambda tok: _text_variant(
        tok, model_type="stablelm", use_qkv_bias=True, partial_rotary_factor=1.0, layer_norm_eps=1e-6
    ),
    "activation 'gelu'": lambda tok: _text_variant(tok, hidden_act="gelu"),
    "rope_type 'linear'": lambda tok: _text_variant(
        tok, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    ),
    "a 4x4 ViT position table": lambda tok: _replace(qwen_architecture_config(tok), "vision", pos_grid=4),
    "64 image queries": lambda tok: _replace(qwen_architecture_config(tok), "resampler", num_queries=64),
    "resampler head_dim 64": lambda tok: _replace(qwen_architecture_config(tok), "resampler", head_dim=64),
}


def _replace(cfg, part, **values):
    import dataclasses

    setattr(cfg, part, dataclasses.replace(getattr(cfg, part), **values))
    return cfg


@pytest.mark.parametrize("reason", list(REFUSED))
def test_an_architecture_the_release_cannot_express_is_refused(reason, qwen_tokenizer):
    cfg = REFUSED[reason](qwen_tokenizer)
    skeleton = build_vlm(cfg, tokenizer=qwen_tokenizer, device="meta", init_weights=False)
    with pytest.raises(UserError, match="the Qwen-VL release layout cannot express") as err:
        check_exportable(skeleton.config, skeleton.llm, qwen_tokenizer, where="SRC/config.json")
    message = str(err.value)
    assert message.startswith("SRC/config.json: ") and "\n" not in message
    assert reason in message


def test_the_release_architecture_itself_passes_the_checks(qwen_tokenizer):
    skeleton = build_vlm(
        qwen_architecture_config(qwen_tokenizer), tokenizer=qwen_tokenizer, device="meta", init_weights=False
    )
    ranks = check_exportable(skeleton.config, skeleton.llm, qwen_tokenizer, where="SRC")
    assert len(ranks) == TINY_NUM_RANKS


def test_every_reason_is_listed_at_once(tiny_vlm):
    # presets.tiny: GQA, a 4x4 position table, 16 queries, resampler heads of 16
    with pytest.raises(UserError) as err:
        check_exportable(tiny_vlm.config, tiny_vlm.llm, tiny_vlm.tokenizer, where="SRC")
    for reason in ("grouped-query attention", "4x4 ViT position table", "16 image queries", "head_dim 16"):
        assert reason in str(err.value)


def test_a_vocabulary_qwen_tiktoken_cannot_carry_is_refused(tiny_tokenizer, qwen_tokenizer, tmp_path):
    skeleton = build_vlm(
        qwen_architecture_config(qwen_tokenizer), tokenizer=qwen_tokenizer, device="meta", init_weights=False
    )
    # A BPE trained with its special tokens first (tests/conftest.py): ids the release cannot have.
    with pytest.raises(
        UserError, match=r"SRC: tokenizer: the release's special tokens follow the \d+ BPE ranks"
    ):
        check_exportable(skeleton.config, skeleton.llm, tiny_tokenizer, where="SRC")
    # The release's vocabulary plus a token of one's own: the release's special tokens are a fixed set.
    write_tiny_tiktoken(tmp_path / "qwen.tiktoken")
    extended = build_qwen_tokenizer(tmp_path / "qwen.tiktoken")
    extended.add_special_tokens({"additional_special_tokens": ["<|my_token|>"]})
    with pytest.raises(
        UserError, match=r"added token\(s\) the release's tokenizer cannot carry.*<\|my_token\|>"
    ):
        check_exportable(skeleton.config, skeleton.llm, extended, where="SRC")


def test_cli_refusal_is_one_line_and_exit_status_2(tiny_vlm, tmp_path, monkeypatch, capsys):
    from models.errors import run_cli
    from models.export_qwenvl import main

    tiny_vlm.save_pretrained(tmp_path / "src")
    # What `python -m models.export_qwenvl SRC OUT` runs, in-process.
    monkeypatch.setattr(sys, "argv", ["export_qwenvl", str(tmp_path / "src"), str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_:
        run_cli(main)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "grouped-query attention" in lines[0] and str(tmp_path / "src" / "config.json") in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_non_empty_output_directory_is_refused(source_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_qwenvl(source_dir, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_a_code_from_directory_without_the_releases_code_is_refused(source_dir, tmp_path):
    with pytest.raises(UserError, match="modeling_qwen.py: not found"):
        export_qwenvl(source_dir, tmp_path / "out", code_from=tmp_path)
    assert not (tmp_path / "out").exists()


def test_a_directory_in_the_release_layout_is_refused(exported, tmp_path):
    with pytest.raises(UserError, match="already in the Qwen-VL release layout"):
        export_qwenvl(exported, tmp_path / "out")
