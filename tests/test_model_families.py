"""Specification of models.families: the HF VLM families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) behind one adapter.

The adapter names each family's parts (for freezing and LoRA), its image placeholder and its M-RoPE
position ids; presets build the released shapes; a released directory loads as it is. Numbers come from
/work/shared/reference/qwen2-vl-family.md (sections 4.2, 6.3, 7.1).
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
import transformers
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode  # sees every tensor a build creates
from transformers import AutoModelForImageTextToText

from models.errors import UserError
from models.families.adapter import HFFamilyModel, require_transformers
from models.families.processor import (
    build_family_processor,
    build_family_tokenizer,
    load_family_processor,
    qwen2_vocab_and_merges,
)
from models.families.specs import FAMILIES, QWEN2_ADDED_TOKENS, preset
from tests.conftest import TINY_NUM_RANKS
from train.freeze import apply_freezing
from train.recipe import FreezeSection

TINY = [f"{name}_tiny" for name in FAMILIES]


@pytest.fixture(scope="module", params=TINY)
def tiny(request) -> HFFamilyModel:
    torch.manual_seed(0)
    return HFFamilyModel.from_preset(request.param)


@pytest.mark.parametrize(
    "name, total, visual",
    [
        ("qwen2_vl_7b", 8_291_375_616, 675_759_104),
        ("qwen2_5_vl_7b", 8_292_166_656, 676_550_144),
        ("qwen3_vl_8b", 8_767_123_696, 576_388_336),
        ("qwen2_vl_tiny", 19_601_664, 79_552),
        ("qwen2_5_vl_tiny", 19_605_728, 83_616),
        ("qwen3_vl_tiny", 19_640_096, 118_176),
    ],
)
def test_presets_have_the_released_shapes(name, total, visual):
    """Parameter counts of the released models built from their config.json (reference 7.1, 6.3)."""
    adapter = HFFamilyModel.from_preset(name, device="meta")
    assert adapter.num_parameters() == total
    assert sum(p.numel() for p in adapter.hf.model.visual.parameters()) == visual


@pytest.mark.parametrize("name", TINY)
def test_a_preset_is_drawn_in_its_storage_dtype_without_an_fp32_copy(name):
    """A bf16 preset never exists in fp32, not even while it is built: the 7B shape's fp32 copy is 31 GiB,
    which an H100 run measured as the whole run's peak (and a 24 GiB card cannot hold). Every tensor of more
    than 1,000 elements created while building is bf16; the model's floating weights are bf16 too."""

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.fp32_elements = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.numel() > 1000:
                self.fp32_elements += out.numel()
            return out

    with Allocations() as allocations:
        model = HFFamilyModel.from_preset(name, dtype=torch.bfloat16)
    assert allocations.fp32_elements == 0
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_every_parameter_belongs_to_exactly_one_part(tiny):
    prefixes = tiny.part_prefixes()
    for name, _ in tiny.named_parameters():
        owners = [part for part in ("vision", "resampler", "llm") if name.startswith(prefixes[part])]
        assert len(owners) == 1, (name, owners)
    assert prefixes["llm"] == ("hf.model.language_model.", "hf.lm_head.")
    assert prefixes["embeddings"] == ("hf.model.language_model.embed_tokens.", "hf.lm_head.")
    projector = {"qwen3_vl": ("hf.model.visual.merger.", "hf.model.visual.deepstack_merger_list.")}
    assert prefixes["resampler"] == projector.get(tiny.spec.name, ("hf.model.visual.merger.",))


def test_freezing_by_the_recipe_trains_only_the_named_parts(tiny):
    """train.freeze reads the adapter's groups as it reads the Qwen-VL model's."""
    decision = apply_freezing(
        tiny, FreezeSection(vision="frozen", resampler="train", llm="frozen", embeddings="frozen")
    )
    assert decision == {"vision": False, "resampler": True, "llm": False, "embeddings": False}
    projector = tiny.part_prefixes()["resampler"]
    for name, param in tiny.named_parameters():
        assert param.requires_grad == name.startswith(projector), name
    tiny.requires_grad_(True)


def test_lora_pattern_stays_inside_the_llm_and_the_vit_blocks():
    """Qwen2.5-VL's ViT MLP has the LLM's leaf names; the LLM's LoRA targets must not reach it."""
    adapter = HFFamilyModel.from_preset("qwen2_5_vl_tiny", device="meta")
    pattern = re.compile(adapter.lora_target_pattern(["q_proj", "gate_proj"], ["attn.qkv"]))
    names = [name for name, _ in adapter.named_modules()]
    matched = [n for n in names if pattern.fullmatch(n)]
    assert "hf.model.language_model.layers.0.mlp.gate_proj" in matched
    assert "hf.model.language_model.layers.1.self_attn.q_proj" in matched
    assert "hf.model.visual.blocks.0.attn.qkv" in matched
    vit_mlp = "hf.model.visual.blocks.0.mlp.gate_proj"
    assert vit_mlp in names and vit_mlp not in matched
    assert len(matched) == 2 * 2 + 2  # 2 LLM layers x (q_proj, gate_proj) + 2 ViT blocks x qkv


def test_placeholder_is_the_vision_span_of_the_config(tiny):
    span = tiny.placeholder
    assert (span.start, span.pad, span.end) == (151652, 151655, 151653)


def test_position_ids_are_mrope_of_the_image_grid(tiny):
    """reference 4.2: a 1x4x4 grid (4 slots after the 2x2 merge) at position 4: T, H, W rows; text after
    the image resumes at 4 + max(h, w) / 2 = 6."""
    ids = torch.tensor([[151644, 872, 198, 151652] + [151655] * 4 + [151653, 5, 6]])
    positions = tiny.mrope.padded(ids, torch.tensor([[1, 4, 4]]))
    assert positions.tolist() == [
        [[0, 1, 2, 3, 4, 4, 4, 4, 6, 7, 8]],
        [[0, 1, 2, 3, 4, 4, 5, 5, 6, 7, 8]],
        [[0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8]],
    ]


def test_position_ids_skip_padding_and_text_only_rows(tiny):
    ids = torch.tensor(
        [[151644, 151652] + [151655] * 4 + [151653, 0, 0], [151644, 5, 6, 7, 8, 9, 10, 11, 12]]
    )
    mask = torch.tensor([[1] * 7 + [0, 0], [1] * 9])
    positions = tiny.mrope.padded(ids, torch.tensor([[1, 4, 4]]), attention_mask=mask)
    assert positions[:, 0].tolist() == [
        [0, 1, 2, 2, 2, 2, 4, 0, 0],
        [0, 1, 2, 2, 3, 3, 4, 0, 0],
        [0, 1, 2, 3, 2, 3, 4, 0, 0],
    ]
    assert positions[:, 1].tolist() == [list(range(9))] * 3
    text_only = tiny.mrope.padded(ids[1:], None)
    assert text_only.tolist() == [[list(range(9))]] * 3


def test_save_pretrained_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    loaded = HFFamilyModel.from_pretrained(tmp_path)
    assert loaded.spec is tiny.spec
    expected = tiny.hf.state_dict()
    assert all(torch.equal(expected[k], v) for k, v in loaded.hf.state_dict().items())
    # The directory is an HF export as vLLM/SGLang read it: the auto class loads it as it is.
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(auto) is tiny.spec.model_class
    assert all(torch.equal(expected[k], v) for k, v in auto.state_dict().items())


def test_a_released_qwen2_5_vl_directory_loads_as_it_is(tmp_path):
    """The Hub layout of Qwen2.5-VL-7B-Instruct (reference 7.2) in a tiny size: a flat config with
    ``rope_scaling: mrope`` and checkpoint keys ``visual.*`` / ``model.*`` (transformers 4.x names)."""
    torch.manual_seed(0)
    source = HFFamilyModel.from_preset("qwen2_5_vl_tiny")
    renamed = {}
    for key, tensor in source.hf.state_dict().items():
        key = re.sub(r"^model\.visual\.", "visual.", key)
        renamed[re.sub(r"^model\.language_model\.", "model.", key)] = tensor.contiguous()
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 128,
        "max_position_embeddings": 4096,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "vocab_size": 151936,
        "vision_config": {
            "depth": 2,
            "hidden_act": "silu",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "in_chans": 3,
            "out_hidden_size": 64,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = HFFamilyModel.from_pretrained(tmp_path)
    assert loaded.spec.name == "qwen2_5_vl"
    assert loaded.config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    expected = source.hf.state_dict()
    got = loaded.hf.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_unsupported_directories_are_refused_by_name(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        HFFamilyModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(UserError, match=r"config\.json: model_type 'llava' is not a supported family"):
        HFFamilyModel.from_pretrained(tmp_path)
    with pytest.raises(UserError, match="unknown model preset 'qwen9_vl'"):
        preset("qwen9_vl")


# ------------------------------------------------------------------ tokenizer and template


@pytest.mark.parametrize(
    "family, sha256",
    [
        ("qwen2_vl", "a0bc6f6fc7a29a80017a433e8f03a1cc1236e838a944a2d034295a60c4f2fddb"),
        ("qwen2_5_vl", "a0bc6f6fc7a29a80017a433e8f03a1cc1236e838a944a2d034295a60c4f2fddb"),
        ("qwen3_vl", "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"),
    ],
)
def test_chat_templates_are_the_released_bytes(family, sha256):
    """SHA-256 pins of the released templates (reference 1.1)."""
    assert hashlib.sha256(FAMILIES[family].chat_template.encode("utf-8")).hexdigest() == sha256


def test_vocab_and_merges_derived_from_tiktoken_are_the_released_files(released_qwen_tiktoken):
    """Qwen2.5-VL-7B-Instruct's vocab.json and merges.txt (reference 2.2, third-party SHA-256 pins)."""
    vocab, merges = qwen2_vocab_and_merges(str(released_qwen_tiktoken))
    vocab_json = json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    merges_txt = "".join(f"{a} {b}\n" for a, b in merges).encode("utf-8")
    assert (
        hashlib.sha256(vocab_json).hexdigest()
        == "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910"
    )
    assert (
        hashlib.sha256(merges_txt).hexdigest()
        == "599bab54075088774b1733fde865d5bd747cbcc7a547c5bc12610e874e26f5e3"
    )


@pytest.mark.parametrize("family, size", [("qwen2_vl", 151657), ("qwen2_5_vl", 151665), ("qwen3_vl", 151669)])
def test_family_tokenizers_carry_their_added_tokens(family, size, released_qwen_tiktoken):
    tokenizer = build_family_tokenizer(FAMILIES[family], released_qwen_tiktoken)
    assert len(tokenizer) == size
    ids = tokenizer.convert_tokens_to_ids(
        [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|box_start|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|image_pad|>",
        ]
    )
    assert ids == [151643, 151644, 151645, 151648, 151652, 151653, 151655]
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tokenizer.encode("<|im_start|>user\n12 cats", add_special_tokens=False) == [
        151644,
        872,
        198,
        16,
        17,
        19423,
    ]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_over_any_vocabulary_the_added_tokens_follow_its_ranks(family, tiny_tiktoken):
    """The release numbers its added tokens from the number of BPE tokens on (151643); over the tests' tiny
    vocabulary they follow its ranks the same way, every one the chat template and model config name."""
    spec = FAMILIES[family]
    tokenizer = build_family_tokenizer(spec, tiny_tiktoken)
    added = [token for token, _ in QWEN2_ADDED_TOKENS[: spec.num_added_tokens]]
    assert len(tokenizer) == TINY_NUM_RANKS + spec.num_added_tokens
    assert tokenizer.convert_tokens_to_ids(added) == [TINY_NUM_RANKS + i for i in range(len(added))]
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    im_start, image_pad = TINY_NUM_RANKS + 1, TINY_NUM_RANKS + 12
    assert tokenizer.encode("<|im_start|><|image_pad|> the", add_special_tokens=False) == [
        im_start,
        image_pad,
        tokenizer.convert_tokens_to_ids("Ġthe"),
    ]


def test_a_preset_for_a_tokenizer_takes_its_token_ids_and_one_row_per_token(tiny_tiktoken, tiny_tokenizer):
    tokenizer = build_family_tokenizer(FAMILIES["qwen2_5_vl"], tiny_tiktoken)
    model = HFFamilyModel.from_preset("qwen2_5_vl_tiny", device="meta", tokenizer=tokenizer)
    names = [
        "<|endoftext|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|image_pad|>",
        "<|vision_end|>",
        "<|video_pad|>",
    ]
    endoftext, im_end, start, pad, end, video = tokenizer.convert_tokens_to_ids(names)
    assert (model.placeholder.start, model.placeholder.pad, model.placeholder.end) == (start, pad, end)
    assert model.config.video_token_id == video
    text_config = model.config.text_config
    assert (text_config.bos_token_id, text_config.eos_token_id) == (endoftext, im_end)
    assert model.hf.get_input_embeddings().num_embeddings == model.hf.lm_head.out_features == len(tokenizer)
    # The Qwen-VL tokenizer of tests/conftest.py has none of the family's vision tokens.
    with pytest.raises(UserError, match=r"preset qwen2_5_vl_tiny: the tokenizer has no <\|image_pad\|>"):
        preset("qwen2_5_vl_tiny", tokenizer=tiny_tokenizer)


def test_a_saved_model_directory_brings_its_processor(tmp_path, tiny_tiktoken):
    """save_pretrained of model + processor, loaded back: same template, same ids; the pixel budget can be
    changed on load (data.min_pixels / data.max_pixels)."""
    spec = FAMILIES["qwen3_vl"]
    built = build_family_processor(spec, tiny_tiktoken)
    built.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    loaded = load_family_processor(tmp_path, max_pixels=200_000)
    assert type(loaded) is spec.processor_class
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is it? 12"}]}]
    assert loaded.apply_chat_template(messages, tokenize=False) == built.apply_chat_template(
        messages, tokenize=False
    )
    text = "<|im_start|>user\n<|box_start|>(1,2)<think> x<|im_end|>"
    assert loaded.tokenizer(text)["input_ids"] == built.tokenizer(text)["input_ids"]
    assert loaded.image_processor.size == {"shortest_edge": spec.min_pixels, "longest_edge": 200_000}


def test_a_transformers_release_without_mm_encoder_outputs_is_refused_in_one_line(monkeypatch):
    """Before 5.18 transformers ignores the vision features the adapter hands it (``mm_encoder_outputs``):
    the model would train its image tokens on nothing, so building one says which release it needs."""
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.raises(UserError, match=r"needs transformers>=5\.18 \(found 5\.17\.0\)"):
        require_transformers(FAMILIES["qwen2_5_vl"])
    monkeypatch.setattr(transformers, "__version__", "5.25.0")
    require_transformers(FAMILIES["qwen2_5_vl"])
