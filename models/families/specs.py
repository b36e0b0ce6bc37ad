"""What differs between the Hugging Face VLM families we train: one `FamilySpec` per family, and its presets.

Everything family-specific lives in these records (transformers classes, image-processor defaults of the
released checkpoints, chat template, added tokens, box convention, model shapes); `models.families.adapter`
and `data.hf_encode` read them and hold no per-family branches of their own. Values come from
/work/shared/reference/qwen2-vl-family.md (sections 2.1, 3.2, 5, 6.3, 7).

Presets: ``<family>_tiny`` (a few layers of width 64: CPU tests and the demo) and the released shapes with
random weights (``qwen2_vl_7b``, ``qwen2_5_vl_7b``, ``qwen3_vl_8b``) for speed runs. A preset has the released
vocabulary's token ids and embedding rows, or, given a tokenizer (one built from another `qwen.tiktoken`, as
the tests' tiny one), that tokenizer's ids and one row per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from models.errors import UserError

_TEMPLATES = Path(__file__).with_name("chat_templates")

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Added tokens of the Qwen2 tokenizer family, in id order right after the BPE tokens: from 151643 on in the
# released vocabulary (reference 2.1). A family's tokenizer carries the first `num_added_tokens` of them.
# (token, special): the Qwen2.5-family tokenizer_config marks tool/FIM/think tokens "special": false (never
# split, but kept by decode(skip_special_tokens)).
QWEN2_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

# The config fields that hold token ids, and the token each names (reference 2.1): the config classes
# default to the released ids; a preset for another tokenizer takes them from it.
CONFIG_TOKEN_FIELDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}
TEXT_CONFIG_TOKEN_FIELDS = {"bos_token_id": "<|endoftext|>", "eos_token_id": "<|im_end|>"}

# Box conventions (data.hf_boxes implements them):
BOX_TOKENS_1000 = (
    "box_tokens_1000"  # <|object_ref_start|>l<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>
)
BOX_JSON_ABSOLUTE = (
    "json_absolute"  # [{"bbox_2d": [x1, y1, x2, y2], "label": l}], pixels of the resized image
)
BOX_JSON_1000 = "json_1000"  # the same JSON, coordinates relative to the image in 0..1000


@dataclass(frozen=True)
class FamilySpec:
    """One HF VLM family: the classes that build it and the conventions its released checkpoints follow."""

    name: str  # our name, also the preset prefix
    model_type: str  # config.json "model_type" of its checkpoints
    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    processor_class: type[ProcessorMixin]
    video_processor_class: type  # the processor classes require one; the recipe feeds no videos
    chat_template_file: str
    num_added_tokens: int  # how many of QWEN2_ADDED_TOKENS its tokenizer has
    patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    min_pixels: int  # the released preprocessor_config's, not the image-processor class default
    max_pixels: int
    box_convention: str
    tiny: Callable[[], PretrainedConfig] = field(repr=False)

    @property
    def chat_template(self) -> str:
        """The released chat template, byte for byte (pinned by SHA-256 in tests/test_model_families.py)."""
        return (_TEMPLATES / self.chat_template_file).read_text(encoding="utf-8")

    @property
    def resize_factor(self) -> int:
        """Image sides are multiples of this: patch size x spatial merge size (2 in every family)."""
        return self.patch_size * 2


def _text_config(
    vocab: int,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    max_positions: int,
    rope_theta: float,
    mrope_section: list[int],
    **extra,
) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": mrope_section},
        **extra,
    )


TINY_VOCAB = 151936  # the real embedding rows: every family token id (up to 151668) must have one


def qwen2_vl_tiny() -> Qwen2VLConfig:
    # In Qwen2-VL the vision config's hidden_size is the LLM width (merger output); embed_dim is the ViT's.
    return Qwen2VLConfig(
        text_config=_text_config(TINY_VOCAB, 64, 128, 2, 4, 2, 4096, 1e6, [2, 3, 3]),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            mlp_ratio=2,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        tie_word_embeddings=False,
    )


def qwen2_5_vl_tiny() -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        text_config=_text_config(TINY_VOCAB, 64, 128, 2, 4, 2, 4096, 1e6, [2, 3, 3]),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
        ),
        tie_word_embeddings=False,
    )


def qwen3_vl_tiny() -> Qwen3VLConfig:
    # Qwen3VLTextConfig.head_dim defaults to 128: a tiny model must set it
    # (sum(mrope_section) = head_dim / 2).
    return Qwen3VLConfig(
        text_config=_text_config(TINY_VOCAB, 64, 128, 2, 4, 2, 4096, 5e6, [2, 3, 3], head_dim=16),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        ),
        tie_word_embeddings=False,
    )


def qwen2_vl_7b() -> Qwen2VLConfig:
    """Qwen2-VL-7B-Instruct's shape (reference 7.1): the Qwen2.5-VL-7B LLM with 32k positions, a 32-layer
    1280-wide ViT with quick-GELU MLPs (ratio 4) and LayerNorm."""
    return Qwen2VLConfig(
        text_config=_text_config(152064, 3584, 18944, 28, 28, 4, 32768, 1e6, [16, 24, 24]),
        vision_config=dict(
            depth=32,
            embed_dim=1280,
            hidden_size=3584,
            mlp_ratio=4,
            num_heads=16,
            hidden_act="quick_gelu",
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        tie_word_embeddings=False,
    )


def qwen2_5_vl_7b() -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-7B-Instruct's config.json @ cc594898 (reference 7.2)."""
    return Qwen2_5_VLConfig(
        text_config=_text_config(152064, 3584, 18944, 28, 28, 4, 128000, 1e6, [16, 24, 24]),
        vision_config=dict(
            depth=32,
            hidden_act="silu",
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            in_chans=3,
            out_hidden_size=3584,
            patch_size=14,
            spatial_merge_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            tokens_per_second=2,
            temporal_patch_size=2,
        ),
        tie_word_embeddings=False,
    )


def qwen3_vl_8b() -> Qwen3VLConfig:
    """Qwen3-VL-8B-Instruct's config.json @ 0c351dd0 (reference 7.2)."""
    return Qwen3VLConfig(
        text_config=_text_config(
            151936, 4096, 12288, 36, 32, 8, 262144, 5e6, [24, 20, 20], head_dim=128, attention_bias=False
        ),
        vision_config=dict(
            deepstack_visual_indexes=[8, 16, 24],
            depth=27,
            hidden_act="gelu_pytorch_tanh",
            hidden_size=1152,
            in_channels=3,
            intermediate_size=4304,
            num_heads=16,
            num_position_embeddings=2304,
            out_hidden_size=4096,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        tie_word_embeddings=False,
    )


QWEN2_VL = FamilySpec(
    name="qwen2_vl",
    model_type="qwen2_vl",
    config_class=Qwen2VLConfig,
    model_class=Qwen2VLForConditionalGeneration,
    processor_class=Qwen2VLProcessor,
    video_processor_class=Qwen2VLVideoProcessor,
    chat_template_file="qwen2_vl.jinja",
    num_added_tokens=14,
    patch_size=14,
    image_mean=OPENAI_CLIP_MEAN,
    image_std=OPENAI_CLIP_STD,
    min_pixels=3136,
    max_pixels=12845056,
    box_convention=BOX_TOKENS_1000,
    tiny=qwen2_vl_tiny,
)
QWEN2_5_VL = FamilySpec(
    name="qwen2_5_vl",
    model_type="qwen2_5_vl",
    config_class=Qwen2_5_VLConfig,
    model_class=Qwen2_5_VLForConditionalGeneration,
    processor_class=Qwen2_5_VLProcessor,
    video_processor_class=Qwen2VLVideoProcessor,
    chat_template_file="qwen2_vl.jinja",  # Qwen2-VL's template, verbatim
    num_added_tokens=22,
    patch_size=14,
    image_mean=OPENAI_CLIP_MEAN,
    image_std=OPENAI_CLIP_STD,
    min_pixels=3136,
    max_pixels=12845056,
    box_convention=BOX_JSON_ABSOLUTE,
    tiny=qwen2_5_vl_tiny,
)
QWEN3_VL = FamilySpec(
    name="qwen3_vl",
    model_type="qwen3_vl",
    config_class=Qwen3VLConfig,
    model_class=Qwen3VLForConditionalGeneration,
    processor_class=Qwen3VLProcessor,
    video_processor_class=Qwen3VLVideoProcessor,
    chat_template_file="qwen3_vl.jinja",
    num_added_tokens=26,
    patch_size=16,
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
    min_pixels=65536,
    max_pixels=16777216,
    box_convention=BOX_JSON_1000,
    tiny=qwen3_vl_tiny,
)

FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (QWEN2_VL, QWEN2_5_VL, QWEN3_VL)}

# preset name -> (family, config builder)
PRESETS: dict[str, tuple[FamilySpec, Callable[[], PretrainedConfig]]] = {
    **{f"{spec.name}_tiny": (spec, spec.tiny) for spec in FAMILIES.values()},
    "qwen2_vl_7b": (QWEN2_VL, qwen2_vl_7b),
    "qwen2_5_vl_7b": (QWEN2_5_VL, qwen2_5_vl_7b),
    "qwen3_vl_8b": (QWEN3_VL, qwen3_vl_8b),
}


def family(name: str) -> FamilySpec:
    """The spec of a family by our name (qwen2_vl, qwen2_5_vl, qwen3_vl); UserError listing them otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"unknown model family {name!r}; expected one of {', '.join(FAMILIES)}") from None


def family_of_model_type(model_type: str, where: str) -> FamilySpec:
    """The spec whose checkpoints carry this config.json model_type; UserError naming ``where`` otherwise."""
    for spec in FAMILIES.values():
        if spec.model_type == model_type:
            return spec
    known = ", ".join(spec.model_type for spec in FAMILIES.values())
    raise UserError(f"{where}: model_type {model_type!r} is not a supported family (supported: {known})")


def preset(
    name: str, tokenizer: PreTrainedTokenizerBase | None = None
) -> tuple[FamilySpec, PretrainedConfig]:
    """(family, config) of a named preset; UserError listing the presets otherwise. With ``tokenizer`` (the
    family's, built from any `qwen.tiktoken`), the config takes its token ids and has one embedding row per
    token; without, the released ids and rows."""
    try:
        spec, build = PRESETS[name]
    except KeyError:
        raise UserError(f"unknown model preset {name!r}; expected one of {', '.join(PRESETS)}") from None
    config = build()
    if tokenizer is None:
        return spec, config
    for target, fields in ((config, CONFIG_TOKEN_FIELDS), (config.text_config, TEXT_CONFIG_TOKEN_FIELDS)):
        for field_name, token in fields.items():
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise UserError(
                    f"preset {name}: the tokenizer has no {token}; build it for family {spec.name}"
                )
            setattr(target, field_name, token_id)
    config.text_config.vocab_size = len(tokenizer)
    return spec, config
