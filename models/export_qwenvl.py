"""Export a VLM directory to the layout of the released Qwen-VL / Qwen-VL-Chat: the inverse of convert_qwenvl.

    python -m models.export_qwenvl SRC_DIR OUT_DIR [--dtype bfloat16] [--dynamic-ntk]
        [--code-from QWEN_VL_DIR]

SRC_DIR is a full VLM export (what `models.load_vlm` reads: a trainer's final/ or merged/ directory,
or a converted release). OUT_DIR receives what the release's own modelling code and the engines that
implement it (vLLM's Qwen-VL) read:
- config.json with QWenConfig's keys (model_type "qwen", a "visual" block);
- model-0000k-of-0000n.safetensors and model.safetensors.index.json under the release's tensor names
  and layouts (`transformer.h.N.attn.c_attn` = [q; k; v], `mlp.w1`/`w2`, the ViT's per-head `in_proj`,
  `transformer.visual.attn_pool.*`);
- qwen.tiktoken, tokenizer_config.json (QWenTokenizer) and generation_config.json (chat_format, eos/pad).
The release's Python files (modeling_qwen.py, tokenization_qwen.py, ...) are Alibaba's, not ours to
ship; `--code-from` copies them from a downloaded release so `trust_remote_code` loading works.

Only models the release's architecture can express are exported. It fixes: a decoder with RMSNorm,
biased q/k/v, an unbiased output projection, SwiGLU(silu), full-head RoPE, as many k/v heads as q heads
and an untied lm_head; a 256-row (16x16) ViT position table; LayerNorm eps 1e-6; 256 image queries
(the tokenizer gives every image 256 slots); resampler heads of 128; a qwen.tiktoken vocabulary. Any
other model is refused with one line listing every reason, before a weight is read. Size is free.

Memory: the model is loaded once (in the export dtype); the fused c_attn and the permuted ViT in_proj
are the only copies made (about a fifth of the weights at full scale).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerFast

from models.build import build_vlm, load_vlm
from models.config import VLMConfig
from models.errors import ArgumentParser, UserError, run_cli
from models.qwen_tokenizer import (
    QWEN_MODEL_MAX_LENGTH,
    tiktoken_ranks_from_tokenizer,
    write_tiktoken_ranks,
)
from models.tokens import ENDOFTEXT, IMG_END, IMG_PAD, IMG_START

if TYPE_CHECKING:
    from models.vlm import VLM

log = logging.getLogger(__name__)

# Constants of the release's code (visual.py, tokenization_qwen.py, modeling_qwen.py); see
# /work/shared/reference/qwen-vl.md sections 1-2.
QWEN_POS_TABLE_ROWS = 256  # visual.py: positional_embedding = randn(256, width)
QWEN_IMAGE_SLOTS = 256  # tokenization_qwen.py: IMG_TOKEN_SPAN, the slots between <img> and </img>
QWEN_RESAMPLER_HEAD_DIM = 128  # visual.py: attn_pool heads = output_dim // 128
QWEN_LN_EPS = 1e-6  # visual.py: norm_layer = partial(nn.LayerNorm, eps=1e-6)
QWEN_SEQ_LENGTH = 2048  # config.json seq_length: where dynamic NTK and log-n scaling start
VLLM_PATCH_GRID = 32  # vLLM counts (image_size // patch_size // 2) ** 2 image tokens: 256 only at 32

# Qwen-VL-Chat's generation_config.json: the defaults for keys the source does not set.
QWEN_VL_CHAT_GENERATION = {
    "chat_format": "chatml",
    "max_window_size": 6144,
    "max_new_tokens": 512,
    "do_sample": True,
    "top_k": 0,
    "top_p": 0.3,
}
RELEASE_CODE_FILES = ("*.py", "LICENSE*", "NOTICE*")  # what --code-from copies

# The decoder parameters the release has a place for (Hugging Face Qwen2 names), per layer and outside.
DECODER_LAYER_PARAMS = frozenset(
    {
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.q_proj.bias",
        "self_attn.k_proj.weight",
        "self_attn.k_proj.bias",
        "self_attn.v_proj.weight",
        "self_attn.v_proj.bias",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    }
)
DECODER_OTHER_PARAMS = frozenset({"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"})
QKV_BIASES = frozenset(f"self_attn.{p}_proj.bias" for p in "qkv")
_LAYER_PARAM = re.compile(r"model\.layers\.(\d+)\.(.+)")


# ---------------------------------------------------------------------------------------------
# What the release can express
# ---------------------------------------------------------------------------------------------


def _decoder_problems(llm: nn.Module) -> list[str]:
    """Why the release's QWen decoder cannot hold this Hugging Face causal LM (empty: it can)."""
    c = llm.config
    problems = []
    if c.tie_word_embeddings:
        problems.append("tied input/output embeddings (the release has a separate lm_head)")
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    if kv_heads != c.num_attention_heads:
        problems.append(
            f"grouped-query attention (num_key_value_heads {kv_heads} != num_attention_heads "
            f"{c.num_attention_heads}; the release's c_attn has one k/v head per q head)"
        )
    head_dim = getattr(c, "head_dim", None)
    if head_dim is not None and head_dim * c.num_attention_heads != c.hidden_size:
        problems.append(f"head_dim {head_dim} x {c.num_attention_heads} heads != hidden_size {c.hidden_size}")
    act = getattr(c, "hidden_act", None)
    if act not in ("silu", "swish"):
        problems.append(f"activation {act!r} (the release's MLP is w1(x) * silu(w2(x)))")
    rope = getattr(c, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type {rope['rope_type']!r} (the release has plain RoPE; see --dynamic-ntk)")
    if rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0)) != 1.0:
        problems.append("partial RoPE (the release rotates the whole head)")
    if getattr(c, "use_sliding_window", False) or any(
        t != "full_attention" for t in getattr(c, "layer_types", None) or []
    ):
        problems.append("sliding-window attention (the release attends to the whole context)")

    norms = {
        type(m).__name__
        for name, m in llm.named_modules()
        if name == "model.norm" or name.endswith(("input_layernorm", "post_attention_layernorm"))
    }
    non_rms = sorted(n for n in norms if not n.endswith("RMSNorm"))
    if non_rms:
        problems.append(f"{'/'.join(non_rms)} norms (the release's decoder uses RMSNorm)")

    # Parameter names: per decoder layer ("model.layers.N.<name>") and outside the layers.
    names = [name for name, _ in llm.named_parameters()]
    per_layer: dict[int, set[str]] = {}
    for name in names:
        if match := _LAYER_PARAM.fullmatch(name):
            per_layer.setdefault(int(match[1]), set()).add(match[2])
    layer_names = set().union(*per_layer.values()) if per_layer else set()
    if any(not QKV_BIASES <= params for params in per_layer.values()):
        problems.append("no q/k/v biases (the release's c_attn always has one)")
    foreign = sorted({n for n in names if not _LAYER_PARAM.fullmatch(n)} - DECODER_OTHER_PARAMS)
    foreign += sorted(f"model.layers.N.{p}" for p in layer_names - DECODER_LAYER_PARAMS)
    if foreign:
        more = f" and {len(foreign) - 6} more" if len(foreign) > 6 else ""
        problems.append(f"parameters the release has no place for: {', '.join(foreign[:6])}{more}")
    lacking = sorted(
        {
            f"model.layers.N.{p}"
            for params in per_layer.values()
            for p in DECODER_LAYER_PARAMS - QKV_BIASES - params
        }
        | (DECODER_OTHER_PARAMS - set(names))
    )
    if lacking:
        problems.append(f"lacks parameters the release needs: {', '.join(lacking[:6])}")
    # Last and always: passing the checks above does not prove the maths equal (e.g. scaled embeddings);
    # Qwen2 is the Hugging Face architecture whose maths the tests pin against the release's.
    if getattr(c, "model_type", None) != "qwen2":
        problems.append(
            f"decoder model_type {c.model_type!r} (the release's decoder is exported from 'qwen2')"
        )
    return problems


def _vision_problems(cfg: VLMConfig) -> list[str]:
    """Why the release's visual.py cannot hold this vision tower and resampler (empty: it can)."""
    problems = []
    if cfg.vision.pos_grid**2 != QWEN_POS_TABLE_ROWS:
        problems.append(
            f"a {cfg.vision.pos_grid}x{cfg.vision.pos_grid} ViT position table (the release's has "
            f"{QWEN_POS_TABLE_ROWS} rows, 16x16)"
        )
    if cfg.resampler.num_queries != QWEN_IMAGE_SLOTS:
        problems.append(
            f"{cfg.resampler.num_queries} image queries (the release's tokenizer gives every image "
            f"{QWEN_IMAGE_SLOTS} slots)"
        )
    if cfg.resampler.head_dim != QWEN_RESAMPLER_HEAD_DIM:
        problems.append(
            f"resampler head_dim {cfg.resampler.head_dim} (the release's is {QWEN_RESAMPLER_HEAD_DIM})"
        )
    for name, eps in (("vision", cfg.vision.ln_eps), ("resampler", cfg.resampler.ln_eps)):
        if eps != QWEN_LN_EPS:
            problems.append(f"{name} LayerNorm eps {eps} (the release's is {QWEN_LN_EPS})")
    return problems


def check_exportable(cfg: VLMConfig, llm: nn.Module, tokenizer, where: str) -> dict[bytes, int]:
    """Refuse (UserError naming `where`) a model the release cannot express; return its qwen.tiktoken ranks.

    `llm` may be on the meta device: only its config, module types and parameter names are read.
    """
    problems = _decoder_problems(llm) + _vision_problems(cfg)
    if problems:
        raise UserError(f"{where}: the Qwen-VL release layout cannot express {'; '.join(problems)}")
    if tokenizer is None:
        raise UserError(f"{where}: no tokenizer beside the model; the release layout needs its qwen.tiktoken")
    ranks = tiktoken_ranks_from_tokenizer(tokenizer, where=f"{where}: tokenizer")
    vocab = tokenizer.get_vocab()
    for token, ours in (
        (IMG_START, cfg.image_start_id),
        (IMG_END, cfg.image_end_id),
        (IMG_PAD, cfg.image_pad_id),
    ):
        if vocab[token] != ours:
            raise UserError(
                f"{where}: the config's id for {token} is {ours}, the tokenizer's is {vocab[token]}"
            )
    rows = llm.config.vocab_size
    if rows < len(tokenizer):
        raise UserError(f"{where}: {rows} embedding rows for a tokenizer of {len(tokenizer)} tokens")
    return ranks


# ---------------------------------------------------------------------------------------------
# Config files
# ---------------------------------------------------------------------------------------------


def mlp_ratio_for(width: int, mlp_dim: int) -> float:
    """The shortest `mlp_ratio` with `int(width * mlp_ratio) == mlp_dim`, as visual.py computes the MLP
    width (1664 wide, 8192 MLP -> 4.9231, the release's own value)."""
    exact = mlp_dim / width
    for digits in range(1, 16):
        ratio = round(exact, digits)
        if int(width * ratio) == mlp_dim:
            return ratio
    ratio = exact
    while int(width * ratio) < mlp_dim:  # float rounding left it a hair short
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def release_config(cfg: VLMConfig, text_config, dtype: torch.dtype, dynamic_ntk: bool) -> dict:
    """config.json with QWenConfig's keys (the inverse of convert_qwenvl.vlm_config_from_qwen).

    `dynamic_ntk` turns on the release's inference-time dynamic NTK and log-n scaling, which act only
    beyond `seq_length` (2048) tokens; off, the release computes exactly what our model does at any length.
    """
    vision = cfg.vision
    theta = float(text_config.rope_parameters["rope_theta"])
    return {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        "attn_dropout_prob": text_config.attention_dropout,
        # The release's code casts the model to the one precision flag that is set.
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "fp32": dtype == torch.float32,
        "emb_dropout_prob": 0.0,
        "hidden_size": text_config.hidden_size,
        "initializer_range": text_config.initializer_range,
        "intermediate_size": 2 * text_config.intermediate_size,  # QWen counts w1 and w2 together
        "kv_channels": text_config.hidden_size // text_config.num_attention_heads,
        "layer_norm_epsilon": text_config.rms_norm_eps,
        "max_position_embeddings": text_config.max_position_embeddings,
        "model_type": "qwen",
        "no_bias": True,
        "num_attention_heads": text_config.num_attention_heads,
        "num_hidden_layers": text_config.num_hidden_layers,
        "onnx_safe": None,
        "rotary_emb_base": int(theta) if theta.is_integer() else theta,
        "rotary_pct": 1.0,
        "scale_attn_weights": True,
        "seq_length": QWEN_SEQ_LENGTH,
        "tie_word_embeddings": False,
        "tokenizer_type": "QWenTokenizer",
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
        "use_dynamic_ntk": dynamic_ntk,
        "use_flash_attn": "auto",
        "use_logn_attn": dynamic_ntk,
        "visual": {
            "heads": vision.heads,
            "image_size": vision.image_size,
            "image_start_id": cfg.image_start_id,
            "layers": vision.layers,
            "mlp_ratio": mlp_ratio_for(vision.width, vision.mlp_dim),
            "n_queries": cfg.resampler.num_queries,
            "output_dim": cfg.hidden_size,
            "patch_size": vision.patch_size,
            "width": vision.width,
        },
        "vocab_size": text_config.vocab_size,
    }


def release_tokenizer_config() -> dict:
    """tokenizer_config.json: the release's QWenTokenizer (remote code) reading qwen.tiktoken."""
    return {
        "model_max_length": QWEN_MODEL_MAX_LENGTH,
        "tokenizer_class": "QWenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
    }


def release_generation_config(source: dict | None, endoftext_id: int, where: str = "model") -> dict:
    """generation_config.json: the source's settings over Qwen-VL-Chat's, eos = pad = <|endoftext|>.

    `chat_format` is what the release's `model.chat` and our eval_mm read to pick the prompt format;
    a source that records none is a raw (base) model, as eval_mm reads it.
    """
    source = dict(source or {})
    source.pop("transformers_version", None)
    chat_format = source.get("chat_format", "raw")
    if chat_format not in ("chatml", "raw"):
        raise UserError(f"{where}: chat_format {chat_format!r}; the release knows 'chatml' and 'raw'")
    return {
        **QWEN_VL_CHAT_GENERATION,
        **source,
        "chat_format": chat_format,
        "eos_token_id": endoftext_id,
        "pad_token_id": endoftext_id,
    }


# ---------------------------------------------------------------------------------------------
# Tensors: convert_qwenvl.RULES read backwards
# ---------------------------------------------------------------------------------------------

Transform = Callable[[torch.Tensor, VLMConfig], torch.Tensor]


def _identity(t: torch.Tensor, cfg: VLMConfig) -> torch.Tensor:
    return t


def _blocked_qkv_to_per_head(t: torch.Tensor, cfg: VLMConfig) -> torch.Tensor:
    """Visual qkv rows [3, heads, head_dim] (ours) -> [heads, 3, head_dim] (the release's in_proj)."""
    heads, width = cfg.vision.heads, cfg.vision.width
    rows = t.reshape(3, heads, width // heads, *t.shape[1:])
    return rows.transpose(0, 1).reshape(t.shape).contiguous()


@dataclass(frozen=True)
class ExportRule:
    source: str  # regex over our key, full match
    target: str  # the release's key; `\1` etc. refer to the regex groups
    part: int | None = None  # index of this block in a fused tensor (c_attn = [q; k; v] rows)
    transform: Transform = _identity


_OURS_LLM = r"llm\.model\.layers\.(\d+)\."
_LLM = r"transformer.h.\1."
_OURS_BLOCK = r"vision\.blocks\.(\d+)\."
_BLOCK = r"transformer.visual.transformer.resblocks.\1."
_VIS = "transformer.visual."
_POOL = _VIS + "attn_pool."

EXPORT_RULES: tuple[ExportRule, ...] = (
    # decoder
    ExportRule(r"llm\.model\.embed_tokens\.weight", "transformer.wte.weight"),
    ExportRule(_OURS_LLM + r"input_layernorm\.weight", _LLM + "ln_1.weight"),
    ExportRule(_OURS_LLM + r"post_attention_layernorm\.weight", _LLM + "ln_2.weight"),
    ExportRule(_OURS_LLM + r"self_attn\.q_proj\.(weight|bias)", _LLM + r"attn.c_attn.\2", part=0),
    ExportRule(_OURS_LLM + r"self_attn\.k_proj\.(weight|bias)", _LLM + r"attn.c_attn.\2", part=1),
    ExportRule(_OURS_LLM + r"self_attn\.v_proj\.(weight|bias)", _LLM + r"attn.c_attn.\2", part=2),
    ExportRule(_OURS_LLM + r"self_attn\.o_proj\.weight", _LLM + "attn.c_proj.weight"),
    ExportRule(_OURS_LLM + r"mlp\.up_proj\.weight", _LLM + "mlp.w1.weight"),  # the ungated branch
    ExportRule(_OURS_LLM + r"mlp\.gate_proj\.weight", _LLM + "mlp.w2.weight"),  # silu(w2(x))
    ExportRule(_OURS_LLM + r"mlp\.down_proj\.weight", _LLM + "mlp.c_proj.weight"),
    ExportRule(r"llm\.model\.norm\.weight", "transformer.ln_f.weight"),
    ExportRule(r"llm\.lm_head\.weight", "lm_head.weight"),
    # vision tower
    ExportRule(r"vision\.patch_embed\.weight", _VIS + "conv1.weight"),
    ExportRule(r"vision\.pos_embed", _VIS + "positional_embedding"),
    ExportRule(r"vision\.ln_pre\.(weight|bias)", _VIS + r"ln_pre.\1"),
    ExportRule(_OURS_BLOCK + r"(ln_1|ln_2)\.(weight|bias)", _BLOCK + r"\2.\3"),
    ExportRule(
        _OURS_BLOCK + r"attn\.qkv\.(weight|bias)",
        _BLOCK + r"attn.in_proj.\2",
        transform=_blocked_qkv_to_per_head,
    ),
    ExportRule(_OURS_BLOCK + r"attn\.proj\.(weight|bias)", _BLOCK + r"attn.out_proj.\2"),
    ExportRule(_OURS_BLOCK + r"mlp\.fc1\.(weight|bias)", _BLOCK + r"mlp.c_fc.\2"),
    ExportRule(_OURS_BLOCK + r"mlp\.fc2\.(weight|bias)", _BLOCK + r"mlp.c_proj.\2"),
    # resampler -> attn_pool, plus its ln_post / proj, which are attn_pool's siblings in the release
    ExportRule(r"resampler\.(query|pos_embed|kv_proj\.weight)", _POOL + r"\1"),
    ExportRule(r"resampler\.(ln_q|ln_kv)\.(weight|bias)", _POOL + r"\1.\2"),
    ExportRule(
        r"resampler\.attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)", _POOL + r"attn.\1"
    ),
    ExportRule(r"resampler\.ln_post\.(weight|bias)", _VIS + r"ln_post.\1"),
    ExportRule(r"resampler\.proj", _VIS + "proj"),
)


def export_state_dict(state_dict: dict[str, torch.Tensor], cfg: VLMConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> the release's (names, fused c_attn, per-head in_proj). Call check_exportable first:
    a key without a rule here is a bug, not a user mistake."""
    exported: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        rule, match = next(((r, m) for r in EXPORT_RULES if (m := re.fullmatch(r.source, key))), (None, None))
        if rule is None:
            raise ValueError(f"no export rule for {key}")
        target = match.expand(rule.target)
        value = rule.transform(tensor, cfg)
        if rule.part is None:
            exported[target] = value
        else:
            fused.setdefault(target, {})[rule.part] = value
    for target, parts in fused.items():
        exported[target] = torch.cat([parts[i] for i in range(len(parts))])  # [q; k; v] row blocks
    return exported


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _write_safetensors(state_dict: dict[str, torch.Tensor], out_dir: Path, max_shard_size: int | str) -> None:
    split = split_torch_state_dict_into_shards(state_dict, max_shard_size=max_shard_size)
    for i, (filename, keys) in enumerate(split.filename_to_tensors.items(), start=1):
        log.info("writing %s (%d/%d)", filename, i, len(split.filename_to_tensors))
        shard = {k: state_dict[k].detach().contiguous().cpu() for k in keys}
        save_file(shard, out_dir / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def _check_destination(out_dir: Path, code_from: Path | None) -> None:
    """Refuse a non-empty OUT_DIR or a --code-from without the release's code, before any work."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: already exists and is not empty; choose a new directory")
    if code_from is not None and not (code_from / "modeling_qwen.py").is_file():
        raise UserError(
            f"{code_from / 'modeling_qwen.py'}: not found; --code-from takes a downloaded "
            "Qwen/Qwen-VL-Chat (or Qwen/Qwen-VL) directory"
        )


def write_release(
    out_dir: str | Path,
    model: VLM,
    ranks: dict[bytes, int],
    generation: dict,
    dtype: torch.dtype | None = None,
    dynamic_ntk: bool = False,
    code_from: str | Path | None = None,
    max_shard_size: int | str = "5GB",
) -> dict:
    """Write `model` in the release layout: `ranks` from check_exportable, `generation` from
    release_generation_config. Atomic: written into a temporary sibling of `out_dir`, renamed when
    complete. `dtype` None keeps the model's (its embeddings' dtype). Returns the config.json written."""
    out_dir, code_from = Path(out_dir), None if code_from is None else Path(code_from)
    _check_destination(out_dir, code_from)
    cfg = model.config
    dtype = dtype or model.llm.get_input_embeddings().weight.dtype
    config = release_config(cfg, model.llm.config, dtype, dynamic_ntk)
    if cfg.vision.image_size // cfg.vision.patch_size != VLLM_PATCH_GRID:
        log.warning(
            "vLLM's Qwen-VL counts (image_size // patch_size // 2)^2 image tokens, %d here, not the "
            "model's %d: vLLM will not serve this model (the release's own code will)",
            (cfg.vision.image_size // cfg.vision.patch_size // 2) ** 2,
            cfg.resampler.num_queries,
        )

    tmp = out_dir.with_name(f".{out_dir.name}.export-tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an export that was killed
    tmp.mkdir(parents=True)
    state_dict = {k: v.to(dtype) for k, v in export_state_dict(model.state_dict(), cfg).items()}
    _write_safetensors(state_dict, tmp, max_shard_size)
    _write_json(tmp / "config.json", config)
    _write_json(tmp / "generation_config.json", generation)
    _write_json(tmp / "tokenizer_config.json", release_tokenizer_config())
    write_tiktoken_ranks(ranks, tmp / "qwen.tiktoken")
    for pattern in RELEASE_CODE_FILES if code_from is not None else ():
        for file in sorted(code_from.glob(pattern)):
            shutil.copyfile(file, tmp / file.name)
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked above
    tmp.rename(out_dir)
    log.info("wrote %d tensors (%s) in the Qwen-VL release layout to %s", len(state_dict), dtype, out_dir)
    return config


def export_vlm(
    model: VLM,
    out_dir: str | Path,
    generation_config: dict | None = None,
    dtype: torch.dtype | None = None,
    dynamic_ntk: bool = False,
    code_from: str | Path | None = None,
    max_shard_size: int | str = "5GB",
) -> dict:
    """Export an in-memory VLM with its tokenizer attached; `generation_config` holds the source's
    generation settings (chat_format, sampling), if any. Returns the config.json written."""
    ranks = check_exportable(model.config, model.llm, model.tokenizer, where="model")
    generation = release_generation_config(generation_config, model.tokenizer.get_vocab()[ENDOFTEXT], "model")
    return write_release(
        out_dir,
        model,
        ranks,
        generation,
        dtype=dtype,
        dynamic_ntk=dynamic_ntk,
        code_from=code_from,
        max_shard_size=max_shard_size,
    )


def read_saved_tokenizer(src_dir: Path):
    """The tokenizer exactly as SRC_DIR's tokenizer.json holds it (None without one).

    Not models.load_tokenizer: given the Qwen2 text config, AutoTokenizer rebuilds a Qwen2Tokenizer whose
    BPE settings differ from the saved ones (ignore_merges), and the check against qwen.tiktoken is exact.
    """
    file = src_dir / "tokenizer.json"
    return PreTrainedTokenizerFast(tokenizer_file=str(file)) if file.is_file() else None


def export_qwenvl(
    src_dir: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    dynamic_ntk: bool = False,
    code_from: str | Path | None = None,
    max_shard_size: int | str = "5GB",
) -> dict:
    """Export the VLM directory SRC_DIR to OUT_DIR in the release layout; returns the config.json written.

    Every check (architecture and vocabulary on a weightless meta-device model, the generation config,
    the destination) runs before a weight is read.
    """
    src_dir = Path(src_dir)
    config_file = src_dir / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"{config_file}: not found; SRC_DIR must be a full VLM export (for a LoRA run, its "
            "merged/ directory: train with merge_on_export: true)"
        )
    if json.loads(config_file.read_text()).get("model_type") == "qwen":
        raise UserError(f"{config_file}: already in the Qwen-VL release layout (model_type 'qwen')")
    try:
        cfg = VLMConfig.load(config_file)
    except ValueError as e:
        raise UserError(str(e)) from e
    tokenizer = read_saved_tokenizer(src_dir)
    skeleton = build_vlm(cfg, device="meta", init_weights=False)
    ranks = check_exportable(skeleton.config, skeleton.llm, tokenizer, where=str(config_file))
    gen_file = src_dir / "generation_config.json"
    source_generation = json.loads(gen_file.read_text()) if gen_file.is_file() else None
    generation = release_generation_config(source_generation, tokenizer.get_vocab()[ENDOFTEXT], str(gen_file))
    _check_destination(Path(out_dir), None if code_from is None else Path(code_from))

    log.info("loading %s", src_dir)
    model = load_vlm(src_dir, dtype=dtype)
    return write_release(
        out_dir,
        model,
        ranks,
        generation,
        dtype=dtype,
        dynamic_ntk=dynamic_ntk,
        code_from=code_from,
        max_shard_size=max_shard_size,
    )


def main(argv: list[str] | None = None, prog: str = "python -m models.export_qwenvl") -> None:
    parser = ArgumentParser(
        prog=prog,
        examples=["runs/my_lora/final/merged exported/my-qwen-vl"],
        description="Export a VLM directory to the layout of the released Qwen-VL(-Chat) (the inverse of "
        "models.convert_qwenvl).",
    )
    parser.add_argument(
        "src_dir", type=Path, help="a full VLM export (final/, merged/ or a converted release)"
    )
    parser.add_argument(
        "out_dir", type=Path, help="where to write the release-layout directory (new or empty)"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument(
        "--dynamic-ntk",
        action="store_true",
        help="turn on the release's dynamic NTK and log-n scaling beyond 2048 tokens (as Qwen-VL-Chat "
        "ships); off, the release computes exactly what this model does",
    )
    parser.add_argument(
        "--code-from",
        type=Path,
        metavar="QWEN_VL_DIR",
        help="copy the release's Python files (and LICENSE/NOTICE) from a downloaded Qwen/Qwen-VL-Chat",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    export_qwenvl(
        args.src_dir,
        args.out_dir,
        dtype=getattr(torch, args.dtype),
        dynamic_ntk=args.dynamic_ntk,
        code_from=args.code_from,
    )


if __name__ == "__main__":
    run_cli(main)
