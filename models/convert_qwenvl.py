"""Convert an official Qwen-VL / Qwen-VL-Chat checkpoint into our VLM directory, without remote code.

    python -m models.convert_qwenvl SRC_DIR OUT_DIR [--dtype bfloat16]

SRC_DIR is a downloaded `Qwen/Qwen-VL` or `Qwen/Qwen-VL-Chat` directory: `config.json` (model_type
"qwen" with a "visual" block), the weights (`pytorch_model-*.bin` or `*.safetensors`, sharded with an
index json or single-file) and `qwen.tiktoken`. OUT_DIR receives what `models.load_vlm` reads.

What maps where (see docs/qwen-vl-import.md for why the results are equivalent):
- Decoder, QWen -> Qwen2 architecture (same maths: RMSNorm, RoPE rotate-half, biased q/k/v, SwiGLU):
  `c_attn` is one [q; k; v] projection (the reference splits its output with `split(hidden, dim=2)`,
  so the rows are three contiguous blocks, not interleaved per head) -> q/k/v_proj; the reference's
  MLP is `c_proj(w1(x) * silu(w2(x)))`, so w2 is the gated branch: gate_proj = w2, up_proj = w1.
  QWen's `intermediate_size` counts w1 and w2 together; Qwen2's counts one branch (half).
- Vision: the reference's visual attention lays `in_proj` rows out per head as [heads, (q, k, v),
  head_dim]; ours (like OpenCLIP) is [(q, k, v), heads, head_dim]. Rows (and bias) are permuted.
- Resampler: `attn_pool.*` keeps nn.MultiheadAttention names; `ln_post` and `proj`, siblings of
  attn_pool in the reference, live in our resampler. Its stored sin-cos `pos_embed` is kept as is.

Checks: the config must describe a model our architecture can express (else ValueError saying why);
every source key must be mapped or known-derivable (rotary inv_freq), every parameter of our model
must be produced, and every shape must match the model built from the converted config.
Memory: the model is built on the meta device (no weights); source shards are read one at a time,
memory-mapped where the format allows, and converted tensors stay views of the mapped file unless a
dtype change or a row permutation needs a copy, so at most one full copy is ever in memory.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from models import build_vlm
from models.config import ResamplerConfig, VisionConfig, VLMConfig
from models.errors import ArgumentParser, MissingFileError, UserError, run_cli
from models.manifest import write_manifest
from models.qwen_tokenizer import build_qwen_tokenizer

log = logging.getLogger(__name__)

QWEN_POS_TABLE_ROWS = 256  # visual.py hard-codes a 256-row (16x16) learned position table
QWEN_RESAMPLER_HEAD_DIM = 128  # visual.py: attn_pool heads = output_dim // 128
QWEN_DEFAULT_QUERIES = 256  # VisionTransformer(n_queries=256) unless config.visual overrides it


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def _require(condition: bool, config_path: Path, message: str) -> None:
    if not condition:
        raise UserError(f"{config_path}: {message}")


def vlm_config_from_qwen(qwen: dict, config_path: Path, image_token_ids: dict[str, int]) -> VLMConfig:
    """Translate a QWen config.json (dict) into our VLMConfig; ValueError for what we cannot express.

    `image_token_ids` maps "<img>", "</img>", "<imgpad>", "<|endoftext|>" to the tokenizer's ids.
    """
    _require(
        qwen.get("model_type") == "qwen" and "visual" in qwen,
        config_path,
        "not a Qwen-VL config (needs model_type 'qwen' and a 'visual' block)",
    )
    _require(
        "quantization_config" not in qwen,
        config_path,
        "quantised checkpoints (e.g. Qwen-VL-Chat-Int4, GPTQ) cannot be converted; use the bf16 release",
    )
    hidden, heads = qwen["hidden_size"], qwen["num_attention_heads"]
    head_dim = qwen.get("kv_channels", hidden // heads)
    _require(
        head_dim * heads == hidden, config_path, f"kv_channels {head_dim} x heads {heads} != hidden {hidden}"
    )
    _require(
        qwen.get("rotary_pct", 1.0) == 1.0, config_path, "rotary_pct != 1 (partial RoPE) is not supported"
    )
    _require(
        qwen.get("no_bias", True), config_path, "no_bias=false (biased c_proj / w1 / w2) is not supported"
    )
    _require(not qwen.get("tie_word_embeddings", False), config_path, "tied embeddings are not supported")
    _require(qwen["intermediate_size"] % 2 == 0, config_path, "intermediate_size must be even (w1 + w2)")

    visual = qwen["visual"]
    output_dim = visual["output_dim"]
    _require(output_dim == hidden, config_path, f"visual.output_dim {output_dim} != hidden_size {hidden}")
    _require(
        output_dim % QWEN_RESAMPLER_HEAD_DIM == 0,
        config_path,
        f"visual.output_dim {output_dim} is not a multiple of the resampler head size 128",
    )
    _require(
        visual["image_start_id"] == image_token_ids["<img>"],
        config_path,
        f"visual.image_start_id {visual['image_start_id']} != "
        f"the tokenizer's <img> id {image_token_ids['<img>']}",
    )

    text_config = dict(
        model_type="qwen2",
        vocab_size=qwen["vocab_size"],
        hidden_size=hidden,
        intermediate_size=qwen["intermediate_size"] // 2,
        num_hidden_layers=qwen["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=qwen.get("max_position_embeddings", 8192),
        rms_norm_eps=qwen["layer_norm_epsilon"],
        rope_parameters={"rope_type": "default", "rope_theta": float(qwen.get("rotary_emb_base", 10000))},
        tie_word_embeddings=False,
        hidden_act="silu",
        attention_dropout=qwen.get("attn_dropout_prob", 0.0),
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=image_token_ids["<|endoftext|>"],
        pad_token_id=image_token_ids["<|endoftext|>"],
    )
    pos_grid = int(round(QWEN_POS_TABLE_ROWS**0.5))
    return VLMConfig(
        vision=VisionConfig(
            image_size=visual["image_size"],
            patch_size=visual["patch_size"],
            width=visual["width"],
            layers=visual["layers"],
            heads=visual["heads"],
            mlp_dim=int(visual["width"] * visual["mlp_ratio"]),  # as visual.py computes it
            pos_grid=pos_grid,
            ln_eps=1e-6,
        ),
        resampler=ResamplerConfig(
            num_queries=visual.get("n_queries", QWEN_DEFAULT_QUERIES),
            head_dim=QWEN_RESAMPLER_HEAD_DIM,
            ln_eps=1e-6,
        ),
        text_config=text_config,
        image_start_id=image_token_ids["<img>"],
        image_end_id=image_token_ids["</img>"],
        image_pad_id=image_token_ids["<imgpad>"],
        pad_token_id=image_token_ids["<|endoftext|>"],
        train_embeddings=False,  # the converted tokenizer already has every special token
    )


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------

Transform = Callable[[torch.Tensor, VLMConfig], list[torch.Tensor]]


def _identity(t: torch.Tensor, cfg: VLMConfig) -> list[torch.Tensor]:
    return [t]


def _split_fused_qkv(t: torch.Tensor, cfg: VLMConfig) -> list[torch.Tensor]:
    """QWen c_attn rows are [q; k; v] as three contiguous blocks of `hidden` rows."""
    hidden = cfg.hidden_size
    if t.shape[0] != 3 * hidden:
        raise UserError(f"expected {3 * hidden} rows, got {tuple(t.shape)}")
    # clone: three views of one storage cannot be saved as separate safetensors entries
    return [part.clone() for part in t.split(hidden, dim=0)]


def _per_head_qkv_to_blocked(t: torch.Tensor, cfg: VLMConfig) -> list[torch.Tensor]:
    """Visual in_proj rows [heads, 3, head_dim] (reference) -> [3, heads, head_dim] (ours)."""
    heads, width = cfg.vision.heads, cfg.vision.width
    if t.shape[0] != 3 * width:
        raise UserError(f"expected {3 * width} rows, got {tuple(t.shape)}")
    rows = t.reshape(heads, 3, width // heads, *t.shape[1:])
    return [rows.transpose(0, 1).reshape(t.shape).contiguous()]


@dataclass(frozen=True)
class Rule:
    source: str  # regex over the QWen key, full match
    targets: tuple[str, ...]  # our key(s); `\1` etc. refer to the regex groups
    transform: Transform = _identity


_LLM = r"transformer\.h\.(\d+)\."
_OUR_LLM = r"llm.model.layers.\1."
_VIS = r"transformer\.visual\."
_BLOCK = _VIS + r"transformer\.resblocks\.(\d+)\."
_OUR_BLOCK = r"vision.blocks.\1."
_POOL = _VIS + r"attn_pool\."

RULES: tuple[Rule, ...] = (
    # decoder
    Rule(r"transformer\.wte\.weight", ("llm.model.embed_tokens.weight",)),
    Rule(_LLM + r"ln_1\.weight", (_OUR_LLM + "input_layernorm.weight",)),
    Rule(_LLM + r"ln_2\.weight", (_OUR_LLM + "post_attention_layernorm.weight",)),
    Rule(
        _LLM + r"attn\.c_attn\.(weight|bias)",
        tuple(_OUR_LLM + f"self_attn.{p}_proj.\\2" for p in "qkv"),
        _split_fused_qkv,
    ),
    Rule(_LLM + r"attn\.c_proj\.weight", (_OUR_LLM + "self_attn.o_proj.weight",)),
    Rule(_LLM + r"mlp\.w1\.weight", (_OUR_LLM + "mlp.up_proj.weight",)),  # the ungated branch
    Rule(_LLM + r"mlp\.w2\.weight", (_OUR_LLM + "mlp.gate_proj.weight",)),  # silu(w2(x))
    Rule(_LLM + r"mlp\.c_proj\.weight", (_OUR_LLM + "mlp.down_proj.weight",)),
    Rule(r"transformer\.ln_f\.weight", ("llm.model.norm.weight",)),
    Rule(r"lm_head\.weight", ("llm.lm_head.weight",)),
    # vision tower
    Rule(_VIS + r"conv1\.weight", ("vision.patch_embed.weight",)),
    Rule(_VIS + r"positional_embedding", ("vision.pos_embed",)),
    Rule(_VIS + r"ln_pre\.(weight|bias)", (r"vision.ln_pre.\1",)),
    Rule(_BLOCK + r"(ln_1|ln_2)\.(weight|bias)", (_OUR_BLOCK + r"\2.\3",)),
    Rule(_BLOCK + r"attn\.in_proj\.(weight|bias)", (_OUR_BLOCK + r"attn.qkv.\2",), _per_head_qkv_to_blocked),
    Rule(_BLOCK + r"attn\.out_proj\.(weight|bias)", (_OUR_BLOCK + r"attn.proj.\2",)),
    Rule(_BLOCK + r"mlp\.c_fc\.(weight|bias)", (_OUR_BLOCK + r"mlp.fc1.\2",)),
    Rule(_BLOCK + r"mlp\.c_proj\.(weight|bias)", (_OUR_BLOCK + r"mlp.fc2.\2",)),
    # resampler (attn_pool) and the post-resampler LayerNorm / projection
    Rule(_POOL + r"(query|pos_embed|kv_proj\.weight)", (r"resampler.\1",)),
    Rule(_POOL + r"(ln_q|ln_kv)\.(weight|bias)", (r"resampler.\1.\2",)),
    Rule(
        _POOL + r"attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
        (r"resampler.attn.\1",),
    ),
    Rule(_VIS + r"ln_post\.(weight|bias)", (r"resampler.ln_post.\1",)),
    Rule(_VIS + r"proj", ("resampler.proj",)),
)

# Source entries that carry nothing to convert: RoPE frequencies, recomputed from rotary_emb_base.
DERIVED_SOURCE_KEYS = re.compile(r"(.*\.)?rotary_emb\.inv_freq")


def convert_tensor(key: str, tensor: torch.Tensor, cfg: VLMConfig) -> dict[str, torch.Tensor] | None:
    """Our tensor(s) for one QWen entry, or None when no rule matches the key."""
    for rule in RULES:
        match = re.fullmatch(rule.source, key)
        if match:
            try:
                parts = rule.transform(tensor, cfg)
            except ValueError as e:
                raise UserError(f"{key}: {e}") from e
            return {match.expand(target): part for target, part in zip(rule.targets, parts, strict=True)}
    return None


# ---------------------------------------------------------------------------------------------
# Reading the source directory
# ---------------------------------------------------------------------------------------------


def source_weight_files(src_dir: Path) -> list[Path]:
    """The weight files of a HF checkpoint directory, safetensors preferred, in index order."""
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = src_dir / index_name
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [src_dir / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise MissingFileError(f"{index}: lists shards that are not in {src_dir}: {missing}")
            return files
        if (src_dir / single_name).exists():
            return [src_dir / single_name]
    raise MissingFileError(f"{src_dir}: no model.safetensors[.index.json] or pytorch_model.bin[.index.json]")


def iter_source_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of one shard. .bin shards are memory-mapped (weights_only: no pickled code)."""
    try:
        if path.suffix == ".safetensors":
            shard = safe_open(str(path), framework="pt", device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (SafetensorError, OSError, RuntimeError, pickle.UnpicklingError) as e:
        raise UserError(f"{path}: cannot read the weights (corrupt or incomplete download?): {e}") from e
    if path.suffix == ".safetensors":
        with shard as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    else:
        yield from state.items()


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------


def _format_keys(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    more = f", ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f" {shown}{more}"


def convert_state_dict(
    src_dir: Path, cfg: VLMConfig, expected_shapes: dict[str, torch.Size], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Read every shard of `src_dir` and return our state dict, checked key by key and shape by shape."""
    converted: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    derived: list[str] = []
    for path in source_weight_files(src_dir):
        log.info("reading %s", path.name)
        for key, tensor in iter_source_tensors(path):
            if DERIVED_SOURCE_KEYS.fullmatch(key):
                derived.append(key)
                continue
            ours = convert_tensor(key, tensor, cfg)
            if ours is None:
                unexpected.append(key)
                continue
            for name, value in ours.items():
                if name not in expected_shapes:
                    unexpected.append(f"{key} (-> {name}, which our model does not have)")
                elif value.shape != expected_shapes[name]:
                    raise UserError(
                        f"{path}: {key} has shape {tuple(tensor.shape)}; as {name} it should be "
                        f"{tuple(expected_shapes[name])} for the model described by config.json"
                    )
                elif name in converted:
                    raise UserError(f"{path}: {key} maps to {name}, which another entry already filled")
                else:
                    converted[name] = value.to(dtype)
    if unexpected:
        raise UserError(
            f"{src_dir}: {len(unexpected)} unexpected checkpoint entries:{_format_keys(unexpected)}"
        )
    missing = [name for name in expected_shapes if name not in converted]
    if missing:
        raise UserError(
            f"{src_dir}: the checkpoint lacks {len(missing)} of our parameters:{_format_keys(missing)}"
        )
    if derived:
        log.info(
            "skipped %d derived entries (rotary inv_freq, recomputed from rotary_emb_base)", len(derived)
        )
    return converted


def convert_qwenvl(
    src_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16
) -> VLMConfig:
    """Convert SRC_DIR (Qwen-VL / Qwen-VL-Chat) into OUT_DIR (our VLM format). Returns the config."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    config_path = src_dir / "config.json"
    if not config_path.is_file():
        raise MissingFileError(f"{src_dir}: not a Qwen-VL checkpoint directory (no config.json)")
    tokenizer = build_qwen_tokenizer(src_dir / "qwen.tiktoken")
    vocab = tokenizer.get_vocab()
    token_ids = {t: vocab[t] for t in ("<img>", "</img>", "<imgpad>", "<|endoftext|>")}
    try:
        cfg = vlm_config_from_qwen(json.loads(config_path.read_text()), config_path, token_ids)
    except json.JSONDecodeError as e:
        raise UserError(f"{config_path}: not valid JSON: {e}") from e
    except (KeyError, TypeError) as e:
        raise UserError(f"{config_path}: missing or malformed entry {e} of a Qwen-VL config") from e
    if len(tokenizer) > cfg.text_config["vocab_size"]:
        raise UserError(
            f"{config_path}: vocab_size {cfg.text_config['vocab_size']} < tokenizer size {len(tokenizer)}"
        )

    # Names and shapes only: on the meta device no memory is allocated for weights. The tokenizer
    # already has every special token, so build_vlm adds none and resizes nothing.
    skeleton = build_vlm(cfg, tokenizer=tokenizer, device="meta", init_weights=False)
    expected_shapes = {name: t.shape for name, t in skeleton.state_dict().items()}
    state_dict = convert_state_dict(src_dir, skeleton.config, expected_shapes, dtype)

    # config.json, safetensors, tokenizer; the manifest comes last, below
    skeleton.save_pretrained(out_dir, state_dict=state_dict, manifest=False)
    # Kept verbatim: it records chat_format ("chatml" for Qwen-VL-Chat, "raw" for Qwen-VL), which
    # eval_mm reads to pick the prompt format, and the release's sampling settings.
    if (src_dir / "generation_config.json").is_file():
        shutil.copyfile(src_dir / "generation_config.json", out_dir / "generation_config.json")
    write_manifest(out_dir)  # sizes and sha256, checked by models.load_pretrained
    log.info("wrote %d tensors (%s) to %s", len(state_dict), dtype, out_dir)
    return skeleton.config


def main(argv: list[str] | None = None, prog: str = "python -m models.convert_qwenvl") -> None:
    parser = ArgumentParser(
        prog=prog,
        examples=["/models/Qwen-VL-Chat ckpt/qwen-vl-chat"],
        description="Convert a Qwen-VL / Qwen-VL-Chat HF directory into a VLM directory (no remote code).",
    )
    parser.add_argument("src_dir", type=Path, help="downloaded Qwen/Qwen-VL or Qwen/Qwen-VL-Chat directory")
    parser.add_argument("out_dir", type=Path, help="where to write the converted model")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    convert_qwenvl(args.src_dir, args.out_dir, dtype=getattr(torch, args.dtype))


if __name__ == "__main__":
    run_cli(main)
