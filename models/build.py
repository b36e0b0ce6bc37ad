"""Construction of a VLM: from configs, a local HF LLM directory and optionally OpenCLIP weights
(``build_vlm``), or from a directory ``VLM.save_pretrained`` wrote (``load_vlm``)."""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm
from transformers import (
    CONFIG_MAPPING,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.initialization import no_init_weights

from models.config import VLMConfig
from models.errors import MissingFileError, UserError
from models.openclip import load_openclip_vision
from models.tokens import TOKENIZER_FILES, ensure_special_tokens, image_token_ids
from models.vlm import SAFETENSORS_INDEX, VLM


def text_config_from_dict(d: dict):
    """A HF ``PretrainedConfig`` from the ``text_config`` dict of a VLMConfig."""
    if "model_type" not in d:
        raise ValueError("text_config needs a 'model_type' (e.g. 'qwen2')")
    return CONFIG_MAPPING[d["model_type"]].from_dict({k: v for k, v in d.items() if k != "model_type"})


def _apply_tokenizer(config: VLMConfig, tokenizer) -> None:
    """Record the tokenizer's image token ids; flag embeddings as trainable if tokens were added."""
    added = ensure_special_tokens(tokenizer)
    ids = image_token_ids(tokenizer)
    config.image_start_id, config.image_end_id, config.image_pad_id = ids.start, ids.end, ids.pad
    config.pad_token_id = tokenizer.pad_token_id
    if added:
        config.train_embeddings = True


def _build_llm(config: VLMConfig, llm_path: str | Path | None, dtype: torch.dtype | None) -> PreTrainedModel:
    if llm_path is not None:
        llm = AutoModelForCausalLM.from_pretrained(
            llm_path, dtype=dtype, attn_implementation=config.attn_implementation, trust_remote_code=False
        )
        config.text_config = llm.config.to_dict()
        return llm
    return AutoModelForCausalLM.from_config(
        text_config_from_dict(config.text_config), dtype=dtype, attn_implementation=config.attn_implementation
    )


def build_vlm(
    config: VLMConfig,
    tokenizer=None,
    llm_path: str | Path | None = None,
    openclip: tuple[str, str] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    init_weights: bool = True,
    keep_fp32: Callable[[VLM], Iterable[nn.Module]] | None = None,
    llm_device: str | torch.device | None = None,
) -> VLM:
    """Build a VLM.

    - ``tokenizer``: special tokens are added when missing (then ``config.train_embeddings`` is set
      and the embeddings are resized), and the image token ids recorded in the config.
    - ``llm_path``: a local HF directory for the LLM (``config.text_config`` is replaced by its
      config); otherwise the LLM is randomly initialised from ``config.text_config``.
    - ``openclip``: ``(model_name, checkpoint_path)`` initialises the vision tower from OpenCLIP.
    - ``device="meta"`` builds without memory (for shapes and parameter counts).
    - ``init_weights=False`` skips random initialisation (weights are about to be loaded).
    - ``keep_fp32``: modules stored in float32 whatever ``dtype`` says (the trainer's trainable modules
      beside bf16 frozen ones), cast before any weights are loaded so loaded values arrive exact.
    - ``llm_device``: build the LLM there instead (``"meta"``: no memory and no values yet, for Q-LoRA,
      which materialises and quantises it one layer at a time: train.lora.quantize_llm_4bit).
    The config is copied, never mutated; the model's own is ``vlm.config``.
    """
    config = copy.deepcopy(config)
    if tokenizer is not None:
        _apply_tokenizer(config, tokenizer)
    skip_init = no_init_weights() if not init_weights else contextlib.nullcontext()
    with torch.device(device or "cpu"), skip_init:
        with torch.device(llm_device or device or "cpu"):
            llm = _build_llm(config, llm_path, dtype)
        if tokenizer is not None and len(tokenizer) > llm.get_input_embeddings().num_embeddings:
            llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        config.text_config["vocab_size"] = llm.get_input_embeddings().num_embeddings
        if config.pad_token_id is not None:
            llm.generation_config.pad_token_id = config.pad_token_id
        model = VLM(config, llm)
    if dtype is not None:
        model.vision.to(dtype)
        model.resampler.to(dtype)
    for module in keep_fp32(model) if keep_fp32 is not None else ():
        module.float()
    if openclip is not None:
        load_openclip_vision(model.vision, *openclip)
    model.tokenizer = tokenizer
    return model


def load_tokenizer(path: str | Path):
    """The tokenizer saved beside a VLM (or any local HF tokenizer directory); no remote code.

    A directory with ``tokenizer.json`` loads exactly that file (PreTrainedTokenizerFast): AutoTokenizer,
    given a VLM directory's LLM config, would rebuild a Qwen2Tokenizer with Qwen2's pre-tokenizer and
    normaliser instead of the saved ones, and encode some texts differently from training."""
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"{path}: tokenizer directory not found (tokenizers are never downloaded)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise MissingFileError(f"{path}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path)
    kwargs = {}
    config_file = path / "config.json"
    if config_file.is_file() and '"vlrecipe_vlm"' in config_file.read_text():
        # A VLM directory: give AutoTokenizer the LLM's config, not our (unknown to it) VLM config.
        kwargs["config"] = text_config_from_dict(VLMConfig.load(config_file).text_config)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False, **kwargs)


def load_vlm(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    keep_fp32: Callable[[VLM], Iterable[nn.Module]] | None = None,
) -> VLM:
    """Load a directory written by ``save_pretrained`` (no remote code, safetensors only), straight onto
    ``device`` in ``dtype``; ``keep_fp32`` (see models.build_vlm) keeps some modules in float32."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MissingFileError(
            f"{config_file}: no VLM config (is {path} a directory from VLM.save_pretrained?)"
        )
    config = VLMConfig.load(config_file)
    if (path / SAFETENSORS_INDEX).is_file():
        weight_map = json.loads((path / SAFETENSORS_INDEX).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise MissingFileError(f"{path}: neither model.safetensors nor {SAFETENSORS_INDEX}")
    model = build_vlm(config, dtype=dtype, device=device, init_weights=False, keep_fp32=keep_fp32)
    # Shard by shard, each tensor read straight onto the device and copied into its parameter: the
    # memory held beyond the model is one shard, never a second copy of the whole state dict.
    expected = set(model.state_dict())
    loaded: set[str] = set()
    unexpected: list[str] = []
    for name in tqdm(files, desc=f"loading {path.name}", unit="shard", disable=len(files) < 2):
        try:
            shard = load_file(path / name, device=str(device or "cpu"))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path / name}: cannot read the weights (corrupt or incomplete?): {e}") from e
        unexpected += model.load_state_dict(shard, strict=False).unexpected_keys
        loaded |= set(shard) & expected
        del shard
    expected_missing = set(model.tied_duplicate_keys(model.state_dict()))
    missing = sorted(expected - loaded)
    if set(missing) - expected_missing or unexpected:
        raise UserError(
            f"{path}: checkpoint does not match the config: "
            f"missing {sorted(set(missing) - expected_missing)[:10]}, "
            f"unexpected {sorted(unexpected)[:10]}"
        )
    if expected_missing:
        model.llm.tie_weights()
    if (path / "tokenizer_config.json").is_file():
        model.tokenizer = load_tokenizer(path)
    return model
