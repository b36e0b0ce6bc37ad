"""Recipes: typed, validated training configurations read from YAML.

A recipe is a YAML file whose top-level sections map onto the dataclasses below. Loading it
  * follows ``extends: base.yaml`` (relative to the file; deep merge, the child wins),
  * applies command-line overrides ``section.key=value``, read by the type of the field they set
    (``parse_override``): a string field takes the text verbatim (paths keep ``#``, ``,`` and spaces), a
    list of strings splits ``[a, b]`` at its top-level commas only (brace patterns stay whole) and takes a
    plain string as a one-item list; numbers, booleans and other values are parsed as YAML,
  * rejects unknown or misspelt keys with a suggestion ("did you mean 'optim.lr'?") and values of
    the wrong type, naming the file and the key.
``save_resolved`` writes the fully resolved recipe (``resolved.yaml``) beside the run.

Each section is a dataclass that owns its fields and, where it has them, its own rules (``validate``: the
``data`` section is ``data.config.DataConfig``, owned by the data package); the rules that tie sections
together are checked here, after every section is built.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data.dataset import DataConfig
from models.errors import UserError
from models.families.specs import PRESETS as FAMILY_PRESETS

TrainOrFrozen = Literal["train", "frozen"]


class RecipeError(UserError):
    """A recipe that cannot be used; the message names the file and the key."""


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
@dataclass
class ModelSection:
    # Which kind of model the section builds (train.assemble.FAMILIES; docs/design.md, "Model families").
    # qwen_vl: the Qwen-VL model (models.VLM); qwen2_vl, qwen2_5_vl, qwen3_vl: transformers' own classes
    # (models.families), from a <family>_* preset or model.init_from a released or exported HF directory.
    family: Literal["qwen_vl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"] = "qwen_vl"
    # Start from any export of a previous stage (models.load_pretrained: a full export, a LoRA run's final/,
    # whose adapter is merged into its base, merged/, adapter/). Takes precedence
    # over preset / llm_path / openclip_*.
    init_from: str | None = None
    # models.presets.<name>, or a family's (models.families.specs.PRESETS; random weights)
    preset: (
        Literal[
            "tiny",
            "demo",
            "small",
            "qwen_vl_7b",
            "qwen2_vl_tiny",
            "qwen2_5_vl_tiny",
            "qwen3_vl_tiny",
            "qwen2_vl_7b",
            "qwen2_5_vl_7b",
            "qwen3_vl_8b",
        ]
        | None
    ) = None
    llm_path: str | None = None  # local HF directory of the LLM (weights + tokenizer)
    tokenizer_path: str | None = None  # default: llm_path, or init_from
    openclip_name: str | None = None  # e.g. "ViT-bigG-14": initialise the vision tower from OpenCLIP
    openclip_checkpoint: str | None = None
    image_size: int | None = None  # override the vision tower's input size (224 in stage 1, 448 later)
    # With preset: at least this many embedding rows (Qwen pads its 151,851 tokens to 151,936); rows past
    # the tokenizer are never input and train only as logits. Lets small tokenizers model the real shape.
    pad_vocab_to: int | None = None

    def validate(self) -> None:
        if self.init_from is None and self.preset is None and self.llm_path is None:
            raise ValueError("set 'model.init_from' (a previous stage) or 'model.preset' / 'model.llm_path'")
        if (self.openclip_name is None) != (self.openclip_checkpoint is None):
            raise ValueError("set both 'model.openclip_name' and 'model.openclip_checkpoint', or neither")
        preset_family = FAMILY_PRESETS[self.preset][0].name if self.preset in FAMILY_PRESETS else "qwen_vl"
        if self.preset is not None and preset_family != self.family:
            raise ValueError(
                f"'model.preset: {self.preset}' is a {preset_family} preset but 'model.family' is "
                f"{self.family}"
            )
        if self.family != "qwen_vl":
            qwen_vl_only = ("llm_path", "openclip_name", "image_size", "pad_vocab_to")
            for key in qwen_vl_only:
                if getattr(self, key) is not None:
                    raise ValueError(
                        f"'model.{key}' is the Qwen-VL model's; a {self.family} model comes from "
                        "'model.preset' or 'model.init_from' (an HF directory)"
                    )


@dataclass
class FreezeSection:
    """What trains. "embeddings" = input embeddings + LM head; "auto" trains them when the LLM trains
    or when special tokens were added to a base tokenizer (VLMConfig.train_embeddings)."""

    vision: TrainOrFrozen = "frozen"
    resampler: TrainOrFrozen = "train"
    llm: TrainOrFrozen = "train"
    embeddings: Literal["train", "frozen", "auto"] = "auto"


@dataclass
class LoraSection:
    enabled: bool = False
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    # Module names inside the LLM (suffixes); the reference's: attention q/k/v/o and MLP gate/up.
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]
    )
    # Module names inside the vision tower's blocks (suffixes, e.g. attn.qkv, attn.proj, mlp.fc1, mlp.fc2):
    # adapters on a frozen ViT (freeze.vision: frozen). Empty = the ViT gets none.
    vision_targets: list[str] = field(default_factory=list)
    merge_on_export: bool = False  # also write a merged full-weight export (final/merged)


@dataclass
class QuantizationSection:
    """Q-LoRA: the LLM decoder's linear layers in 4-bit through bitsandbytes (CUDA only)."""

    enabled: bool = False
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


@dataclass
class OptimSection:
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.05
    vit_layer_decay: float = 1.0  # lr of ViT block i = lr * decay ** (num_blocks - i); 1.0 = off
    clip_grad: float = 1.0  # max global grad norm; 0 = no clipping


@dataclass
class ScheduleSection:
    name: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr: float = 0.0  # cosine ends here (scaled like lr for ViT layer-wise decay)


@dataclass
class TrainSection:
    steps: int | None = None  # optimiser steps; exactly one of steps / epochs
    epochs: float | None = None
    micro_batch: int = 1  # samples (preference pairs) per rank and micro-batch
    # Packed map-style data: a micro-batch also closes before its tokens would exceed this (micro_batch then
    # caps its samples), so steps hold about the same work whatever the images' sizes (data.sampler.
    # token_batches; the samples' lengths are counted once at start-up). None: micro_batch samples.
    micro_batch_tokens: int | None = None
    grad_accum: int = 1
    bf16: bool = True  # autocast to bfloat16 (parameters stay fp32 outside DeepSpeed)
    grad_checkpointing: bool = False
    seed: int = 42
    resume: str | None = None  # "auto" = newest checkpoint in checkpoint.out_dir, or a checkpoint path
    max_bad_steps: int = 10  # abort after this many skipped non-finite steps
    # Recorded in the export (eval picks ChatML after sft and dpo); dpo trains on preference pairs
    # (`preference`).
    stage: Literal["pretrain", "multitask", "sft", "dpo"] = "pretrain"
    stop_after_steps: int | None = (
        None  # end the run early (tests of resume); the schedule still uses `steps`
    )
    # Run a micro-batch as several forward/backward passes of whole rows of at most this many tokens: bounds
    # activation memory whatever the samples' lengths (16 x 2048-token samples = 4 passes of 8192), while
    # short samples still fill a pass. The loss is that of the whole step. None = one pass per micro-batch.
    max_forward_tokens: int | Literal["auto"] | None = None
    # The largest planned peak the run may reach, in GiB (what peak_mem_gib measures), or "auto": the GPU's
    # memory less the planner's allowance (CUDA context, NCCL, allocator slack). The trainer then chooses the
    # fastest setting that fits for every setting left at "auto": max_forward_tokens,
    # perf.checkpoint_llm_layers, perf.offload_activations, perf.checkpoint_vision (train/budget.py;
    # docs/training.md). None, or no CUDA device: off ("auto" settings as without a budget: all checkpointed,
    # no offload, forwards of one row).
    memory_budget: float | Literal["auto"] | None = None

    def validate(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of 'train.steps' and 'train.epochs'")
        if isinstance(self.memory_budget, float) and self.memory_budget <= 0:
            raise ValueError(
                f"'train.memory_budget' must be a positive number of GiB or auto, got {self.memory_budget:g}"
            )
        for name in ("micro_batch", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"'train.{name}' must be >= 1")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 1:
            raise ValueError(
                "'train.micro_batch_tokens' must be >= 1 (or null: batches of micro_batch samples)"
            )


@dataclass
class ParallelSection:
    # auto: DDP when launched with several processes, a single process otherwise.
    mode: Literal["auto", "ddp", "zero2", "zero3"] = "auto"
    deepspeed_config: str | None = None  # your DeepSpeed JSON instead of train/ds_configs/<mode>.json
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU


@dataclass
class CheckpointSection:
    out_dir: str = "runs/default"  # the run directory: checkpoints/, final/, resolved.yaml, logs
    every: int = 0  # save every N optimiser steps; 0 = only the final export
    keep_last: int = 2


@dataclass
class LogSection:
    backend: Literal["console", "wandb", "tensorboard"] = "console"
    every: int = 10  # optimiser steps between logged lines (one host sync each)
    project: str = "vlrecipe"
    run_name: str | None = None
    progress_bar: bool = True


@dataclass
class EvalSection:
    benches: list[str] = field(default_factory=list)  # evaluated on the final export; empty = none
    data_root: str | None = None
    limit: int | None = None
    batch_size: int = 32  # prompts per batch (eval_mm.runner.evaluate)


@dataclass
class PerfSection:
    """Speed switches (measured in docs/benchmarks.md; applied by train.perf.apply_perf_switches).
    Every setting computes the same loss within bf16 tolerance (tests/test_perf_*.py). "auto" turns a
    switch on where it runs (CUDA, the package importable, a supported decoder) and off elsewhere, with
    one log line saying why."""

    loss_impl: Literal["torch", "chunked", "liger", "auto"] = (
        "torch"  # models.loss; auto = liger on CUDA, else chunked
    )
    # Decoder attention. varlen (torch flash varlen, sample boundaries shipped by the collator) and
    # flex_attention confine attention to each packed sample without a dense mask; training only.
    attention: Literal["sdpa", "flex_attention", "varlen"] = "sdpa"
    # With train.grad_checkpointing: decoder layers recomputed (None = all; auto: train.memory_budget chooses)
    checkpoint_llm_layers: int | Literal["auto"] | None = None
    # With train.grad_checkpointing, the resampler (and a vision tower gradient runs through) recomputed too.
    checkpoint_vision: bool | Literal["auto"] = True
    liger_kernels: bool | Literal["auto"] = "auto"  # liger-kernel RMSNorm / RoPE / SwiGLU in a Qwen2 decoder
    compile_llm: bool | Literal["auto"] = False  # torch.compile each decoder layer (auto: CUDA, not 4-bit)
    compile_vision: bool | Literal["auto"] = False  # torch.compile each vision block (auto: CUDA)
    # With train.bf16: build / load frozen weights in bf16 (autocast computes in bf16 anyway) and only the
    # trainable ones in fp32, straight onto the GPU. DeepSpeed modes store everything in bf16 regardless.
    frozen_bf16: bool = True
    check_image_spans: bool = True  # False skips VLM's per-batch span check (one host sync)
    # The LM head and loss only at the supervised positions the collator ships (an SFT row is mostly prompt
    # and image slots, whose [tokens, vocab] logits the loss never uses); False: at every position.
    loss_at_label_positions: bool = True
    # What autograd keeps across the forward (with checkpointed layers: each layer's input) waits in pinned
    # host memory, copied on side streams (train.offload); CUDA only, ignored elsewhere.
    offload_activations: bool | Literal["auto"] = False
    # LoRA linears of the parts that run uncompiled (Q-LoRA's decoder, DPO's, ...) with the adapter's
    # scaling on its rank-r product and its add inside the matrix product (train.lora.fuse_lora_forwards).
    # Compiled parts keep peft's forward: inductor fuses its element-wise work itself.
    # False: peft's everywhere.
    fused_lora: bool = True
    # False: PyTorch's scaled_dot_product_attention never picks its cuDNN backend (the ViT's and the
    # resampler's attention), which builds a plan per new batch shape (a step meeting a new image count
    # took 0.2-0.5 s more on one H100); flash attention runs instead. True: torch's default choice.
    cudnn_attention: bool = False
    # The frozen linears' products (decoder layers, vision blocks: forward and input gradient) in FP8 through
    # torchao (models/fp8.py). Not loss-equal (docs/training.md says when to use it); CUDA with compute
    # capability >= 8.9 only, else off with a log line.
    fp8: bool = False
    # The frozen q/k/v projections of each decoder layer as one matrix product, and gate/up as another, the
    # LoRA adapters adding their own products to their slices (models/fused_projections.py; loss-equal, no
    # second copy of the weights). Off until a GPU measurement shows it pays (docs/benchmarks.md); "auto"
    # resolves to off with a log line. Not with Q-LoRA's 4-bit layers, perf.fp8, ZeRO or a trained LLM.
    fuse_frozen_projections: bool | Literal["auto"] = False


@dataclass
class PreferenceSection:
    """Preference optimisation (train.stage: dpo) on chosen/rejected pairs; docs/training.md "DPO"."""

    loss: Literal["sigmoid", "ipo"] = "sigmoid"  # DPO's -log sigmoid(beta * margin), or IPO's squared loss
    beta: float = 0.1  # how far the policy may move from the reference (the KL weight)
    label_smoothing: float = 0.0  # sigmoid only: the chance a pair's labels are flipped (conservative DPO)
    sft_weight: float = 0.0  # > 0 adds sft_weight x the token-mean NLL of the chosen answers (RPO)
    # Where the reference log-probs come from: auto = adapter_disabled with LoRA, frozen_copy otherwise.
    # adapter_disabled: the policy network with its LoRA adapter off (no second copy); frozen_copy: a frozen
    # copy of the initial model (sharded alike under ZeRO-3); precomputed: one pass over the data before
    # training, stored in OUT/reference_logps.safetensors.
    reference: Literal["auto", "frozen_copy", "adapter_disabled", "precomputed"] = "auto"

    def validate(self) -> None:
        """The section's own rules; checked for train.stage: dpo only (other stages ignore it)."""
        if self.beta <= 0:
            raise ValueError(f"'preference.beta' must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"'preference.label_smoothing' must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError("'preference.label_smoothing' applies to loss: sigmoid only")
        if self.sft_weight < 0:
            raise ValueError(f"'preference.sft_weight' must be >= 0, got {self.sft_weight}")


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=lambda: DataConfig(paths=[]))  # the data package's section
    freeze: FreezeSection = field(default_factory=FreezeSection)
    lora: LoraSection = field(default_factory=LoraSection)
    quantization: QuantizationSection = field(default_factory=QuantizationSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    eval: EvalSection = field(default_factory=EvalSection)
    perf: PerfSection = field(default_factory=PerfSection)
    preference: PreferenceSection = field(default_factory=PreferenceSection)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read ``path`` (following ``extends``), apply ``key.sub=value`` overrides, validate."""
    path = Path(path)
    return recipe_from_dict(_read_with_extends(path, seen=()), source=str(path), overrides=overrides)


def recipe_from_dict(
    raw: dict[str, Any], source: str = "<dict>", overrides: list[str] | tuple[str, ...] = ()
) -> Recipe:
    """Validate a plain dict (already merged), after ``key.sub=value`` overrides, into a Recipe."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        _apply_override(raw, item, data_schema=DataConfig)
    data_raw = raw.pop("data", None) or {}
    recipe = _build(Recipe, raw, prefix="", source=source)
    recipe.data = _build(DataConfig, data_raw, prefix="data.", source=source)
    try:
        for section in (recipe.model, recipe.train, recipe.data):
            section.validate()
        _check_consistency(recipe)
    except ValueError as e:
        raise RecipeError(f"{source}: {e}") from e
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(recipe)


def save_resolved(recipe: Recipe, path: str | Path) -> None:
    """Write the fully resolved recipe (every default filled in) as YAML."""
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))


def _read_with_extends(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise RecipeError(f"{path}: 'extends' cycle through {[str(p) for p in seen]}")
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    base_name = raw.pop("extends", None)
    if base_name is None:
        return raw
    base = _read_with_extends((path.parent / base_name), seen + (path,))
    return _deep_merge(base, raw)


def _deep_merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(raw: dict[str, Any], item: str, data_schema: type) -> None:
    if "=" not in item:
        raise RecipeError(f"override {item!r}: expected section.key=value")
    dotted, _, text = item.partition("=")
    keys = dotted.strip().split(".")
    value = parse_override(_field_type(keys, data_schema), text, item)
    node = raw
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"override {item!r}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def _field_type(keys: list[str], data_schema: type) -> Any:
    """The annotation of the field ``keys`` names (``data.*`` in ``data_schema``), or None when no field
    has that name (the validation then names the unknown key and suggests the closest)."""
    cls: Any = Recipe
    tp: Any = None
    for key in keys:
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if key not in hints:
            return None
        tp = data_schema if (cls is Recipe and key == "data") else hints[key]
        cls = tp
    return tp


# Override text is read by the type of the field it sets, so that a path is never cut by YAML syntax: a
# YAML reading of ``runs/my run #1`` ends at the comment, ``[a,b.json]`` is two items and
# ``[shard-{0..9}.tar]`` is a syntax error. The rule:
#   * a string field (str, a Literal of strings, either or None) takes the text verbatim; ``null``, ``~`` or
#     nothing sets None where None is allowed; a text in matching quotes is that quoted YAML string;
#   * a list of strings: ``[a, b]`` splits at the commas outside quotes, braces and brackets (each item as a
#     string field reads it), anything else is a one-item list;
#   * every other field (numbers, booleans, lists of numbers, sections) is parsed as YAML.
# docs/training.md "Overrides" says the same for users.
_NULL_TEXTS = ("", "null", "~")
_QUOTES = ("'", '"')
_CLOSING = {"[": "]", "{": "}", "(": ")"}


def parse_override(tp: Any, text: str, item: str) -> Any:
    """The value of the override ``item`` (``key=text``) for a field of type ``tp`` (None: no such field)."""
    text = text.strip()
    if tp is not None and _allows_none(tp) and text in _NULL_TEXTS:
        return None
    if tp is not None and _is_string_type(tp):
        return _string_item(text, item)
    item_tp = _list_item_type(tp)
    if item_tp is not None and _is_string_type(item_tp):
        if text.startswith("[") and text.endswith("]"):
            return [_string_item(part, item) for part in _split_top_level(text[1:-1], item)]
        return [_string_item(text, item)]
    try:
        return yaml.safe_load(text) if text else None
    except yaml.YAMLError as e:
        if tp is None:
            return text  # an unknown key: the validation names it, whatever its value
        problem = getattr(e, "problem", None) or "not valid YAML"
        key = item.partition("=")[0]
        raise RecipeError(
            f"override {item!r}: cannot read {text!r} as {_type_text(tp)} ({problem}); write "
            "it as YAML and quote the whole override for the shell, e.g. "
            f"'{key}={_example(tp)}'"
        ) from e


def _type_text(tp: Any) -> str:
    return str(tp).replace("typing.", "") if typing.get_origin(tp) else _type_name(tp)


def _example(tp: Any) -> str:
    """A well-formed override value for a (non-string) field of type ``tp``, for error messages."""
    members = [a for a in typing.get_args(tp) if a is not type(None)] if _allows_none(tp) else [tp]
    tp = members[0]
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return "[0.9, 0.98]" if typing.get_args(tp)[:1] == (float,) else "[1, 2]"
    if dataclasses.is_dataclass(tp) or origin is dict:
        return "{key: value}"
    return {bool: "true", int: "8", float: "1.0e-4"}.get(tp, "value")


def _string_item(text: str, item: str) -> str:
    """One string: verbatim, or the YAML string a pair of matching quotes holds."""
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] == text[0]:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = None
        if isinstance(value, str):
            return value
        raise RecipeError(
            f"override {item!r}: {text} is not a valid quoted string; inside double quotes "
            'write \\" for a quote, e.g. key="runs/a \\"b\\"" (or leave the quotes off: the '
            "text is kept)"
        )
    return text


def _split_top_level(inner: str, item: str) -> list[str]:
    """The items of a list override's inside: split at commas outside quotes, {braces} and [brackets]."""
    parts, current, open_brackets, quote = [], [], [], None
    for char in inner:
        if quote:
            quote = None if char == quote else quote
        elif char in _QUOTES and not "".join(current).strip():
            quote = char  # a quote opens only at an item's start: runs/it's.json keeps its apostrophe
        elif char in _CLOSING:
            open_brackets.append(char)
        elif open_brackets and char == _CLOSING[open_brackets[-1]]:
            open_brackets.pop()
        elif char == "," and not open_brackets:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    if quote or open_brackets:
        key = item.partition("=")[0]
        raise RecipeError(
            f"override {item!r}: an unclosed {quote or open_brackets[-1]} in the list; quote "
            "each item that holds a comma, bracket or quote, and the whole override for the "
            "shell, e.g. "
            f"'{key}=[\"runs/a,b.json\", c.json]'"
        )
    last = "".join(current).strip()
    if last:
        parts.append(last)  # (an empty last item is YAML's trailing comma: [a, b,])
    if any(not part for part in parts):
        raise RecipeError(f"override {item!r}: an empty item in the list (two commas in a row)")
    return parts


def _allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _is_string_type(tp: Any) -> bool:
    """str, a Literal of strings, or a union of those with None."""
    if tp is str:
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return all(isinstance(a, str) for a in args)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        return bool(members) and all(_is_string_type(a) for a in members)
    return False


def _list_item_type(tp: Any) -> Any:
    """The item type of ``list[X]`` / ``tuple[X, ...]`` (also within ``| None``), else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        return _list_item_type(members[0]) if len(members) == 1 else None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list and args:
        return args[0]
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    return None


# --------------------------------------------------------------------------------------------------
# Validation: dataclass fields drive everything, so the schema lives in one place (the classes above).
# --------------------------------------------------------------------------------------------------
def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or "recipe"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: '{where}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known keys: {', '.join(names)})"
            raise RecipeError(f"{source}: unknown key '{prefix}{key}'{hint}")
    kwargs = {}
    for name in names:
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], f"{prefix}{name}", source)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{source}: section '{where}': {e}") from e


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert lists to tuples and ints to floats."""

    def bad(expected: str) -> RecipeError:
        return RecipeError(f"{source}: '{key}' must be {expected}, got {value!r} ({type(value).__name__})")

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=f"{key}.", source=source)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, key, source)
            except RecipeError as e:
                errors.append(str(e))
        raise bad(" or ".join(_type_name(a) for a in args))
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in args:
            return "on" if value else "off"  # YAML 1.1 reads a bare off / on (data.check: off) as a bool
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RecipeError(f"{source}: '{key}' must be one of {list(args)}, got {value!r}{hint}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if origin is list and isinstance(value, str):
        value = [value]  # a plain string where a list is expected: `paths: data.json`
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad(f"a list ({_type_name(tp)})")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise bad(f"a list of {len(args)} items")
            return tuple(_coerce(a, v, f"{key}[{i}]", source) for i, (a, v) in enumerate(zip(args, value)))
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return dict(value)
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise bad(tp.__name__)
        return value
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_consistency(recipe: Recipe) -> None:
    """The rules that tie sections together (ValueError naming the keys)."""
    if recipe.quantization.enabled and not recipe.lora.enabled:
        raise ValueError("'quantization.enabled' (Q-LoRA) needs 'lora.enabled: true'")
    if recipe.quantization.enabled and recipe.parallel.mode == "zero3":
        raise ValueError("4-bit Q-LoRA cannot be sharded by ZeRO-3; use ddp or zero2")
    d = recipe.data
    if d.pack_len is not None and d.pack_len > d.max_len and recipe.perf.attention == "sdpa":
        raise ValueError(
            f"'data.pack_len' > 'data.max_len' with 'perf.attention: sdpa' builds a dense "
            f"{d.pack_len}x{d.pack_len} mask per row; use varlen or flex_attention"
        )
    if recipe.train.micro_batch_tokens is not None:
        d.check_token_batches()
    if recipe.lora.vision_targets and recipe.freeze.vision == "train":
        raise ValueError("'lora.vision_targets' adapts a frozen vision tower; set 'freeze.vision: frozen'")
    if recipe.model.family != "qwen_vl":
        _check_family(recipe)
    if recipe.train.stage == "dpo":
        recipe.preference.validate()
        _check_preference(recipe)


def _check_family(recipe: Recipe) -> None:
    """What a Hugging Face family (model.family other than qwen_vl) does not train yet."""
    family = recipe.model.family
    if recipe.train.stage not in ("sft", "dpo"):
        raise ValueError(
            f"'model.family: {family}' trains 'train.stage: sft' (chat records) or dpo (preference pairs); "
            f"{recipe.train.stage} is the Qwen-VL model's for now"
        )
    reference = recipe.preference.reference
    if recipe.train.stage == "dpo" and (
        reference == "frozen_copy" or (reference == "auto" and not recipe.lora.enabled)
    ):
        raise ValueError(
            f"'model.family: {family}' with 'train.stage: dpo' takes 'preference.reference: "
            "adapter_disabled' (with LoRA) or 'precomputed'; a frozen copy (the default without LoRA) is the "
            "Qwen-VL model's for now"
        )
    if recipe.data.streaming:
        raise ValueError(f"'model.family: {family}' reads its data map-style; set 'data.streaming: false'")
    if recipe.optim.vit_layer_decay != 1.0:
        raise ValueError(f"'optim.vit_layer_decay' is not supported for 'model.family: {family}' yet")
    if recipe.perf.attention == "flex_attention":  # transformers refuses it for these text models
        raise ValueError(
            f"'perf.attention: flex_attention' is not available for 'model.family: {family}' (transformers "
            "has no flex attention for its text model): use varlen (packed rows, CUDA) or sdpa"
        )


def _check_preference(recipe: Recipe) -> None:
    p, d = recipe.preference, recipe.data
    if p.reference == "adapter_disabled" and not recipe.lora.enabled:
        raise ValueError("'preference.reference: adapter_disabled' needs 'lora.enabled: true'")
    if p.reference == "frozen_copy" and recipe.lora.enabled:
        raise ValueError(
            "with LoRA the reference is the network with its adapter off: use "
            "'preference.reference: adapter_disabled' (no second copy) or precomputed"
        )
    if d.streaming:
        raise ValueError("'train.stage: dpo' reads preference pairs map-style; set 'data.streaming: false'")
    if d.packing and d.row_len < 2 * d.max_len:
        raise ValueError(
            f"with 'train.stage: dpo' a packed row holds both sequences of a pair: set "
            f"'data.pack_len' >= 2 x 'data.max_len' ({2 * d.max_len})"
        )
