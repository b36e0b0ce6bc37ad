"""From a recipe to the model it trains: built, frozen, (quantised), (LoRA-wrapped), switched for speed.

``assemble(recipe, device)`` is the one place a recipe's model sections (model, freeze, quantization, lora,
perf, and data.image_size) become a model. The trainer (train.loop), the planner (train.plan, on the meta
device) and the data check (train.data_check, through the same family's tokenizer) all go through here, so
what they count, check and train is one model.

The model family (``model.family`` in the recipe) decides how a model and its tokenizer are built; everything
after the build (freezing by ``module_groups()``, LoRA, perf switches) is the same for every family.
docs/design.md ("Model families") states what a family must provide.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from transformers import AutoConfig

from data.config import DataConfig
from data.sample_builder import FamilySampleBuilder, SampleBuilder
from models import presets
from models.attention import set_vision_varlen
from models.build import build_vlm, load_tokenizer
from models.config import VLMConfig
from models.errors import UserError
from models.families.adapter import HFFamilyModel
from models.families.processor import build_family_processor, load_family_processor
from models.families.specs import FAMILIES as FAMILY_SPECS
from models.families.specs import PRESETS as FAMILY_PRESETS
from models.families.specs import FamilySpec
from models.families.specs import preset as family_preset
from models.loading import export_config_and_tokenizer, load_pretrained
from models.tokens import ensure_special_tokens
from train.dpo import runs_adapter_off_reference
from train.flops import (
    StepFlops,
    forward_flops,
    forward_parts,
    llm_forward_flops,
    llm_step_flops,
    qwen_vl_forward_parts,
    step_flops,
    vit_forward_flops,
)
from train.freeze import apply_freezing, trainable_modules
from train.lora import apply_lora, fuse_lora_forwards, quantize_llm_4bit
from train.memory import Dims, ModelShape, decoder_dims
from train.perf import apply_perf_switches, frozen_to_bf16, resolve_perf
from train.recipe import ModelSection, PerfSection, Recipe

DEFAULT_PRESET = "qwen_vl_7b"  # the shape a recipe without model.preset builds (and plans)
SYNTHETIC_VOCAB = 1024  # data.synthetic's tokenizer: the tiny presets' vocabulary when no tokenizer is given


@dataclass
class Assembled:
    """What ``assemble`` hands out."""

    model: nn.Module  # what trains: the VLM, or peft's model around it under LoRA
    vlm: nn.Module  # the VLM itself (the same object as ``model`` without LoRA)
    tokenizer: Any  # None on the meta device when no tokenizer files exist yet (a template recipe)
    trains: dict[str, bool]  # group -> trains (train.freeze.apply_freezing)
    adapters: dict[str, int]  # LoRA adapter parameter name -> size
    perf: PerfSection | None  # the resolved perf section; None on the meta device (nothing runs there)
    notes: list[str] = field(default_factory=list)  # what was resolved (perf auto; the planner's fallbacks)

    @property
    def trainable(self) -> set[str]:
        return {name for name, p in self.model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------ families
class ModelFamily(Protocol):
    """How one kind of model is built from the recipe's model section (docs/design.md, "Model families").
    The model it builds provides ``module_groups()``, ``config.vision.image_size``,
    ``config.num_image_tokens`` and ``set_runtime(models.vlm.RuntimeOptions)``."""

    def tokenizer(self, m: ModelSection) -> Any:
        """The tokenizer training will use, its special tokens added; UserError when the recipe names none."""

    def image_tokens(self, m: ModelSection) -> int | None:
        """Tokens one image takes in a sample (for the data check's lengths); None when each image takes its
        own count (the data check then reads it through ``sample_builder``)."""

    def build(
        self,
        m: ModelSection,
        dtype: torch.dtype | None,
        device: torch.device | None,
        keep_fp32,
        llm_on_meta: bool,
    ) -> tuple[nn.Module, Any]:
        """(model, tokenizer) with weights: loaded, or drawn on ``device``."""

    def build_meta(self, m: ModelSection, source: str, notes: list[str]) -> tuple[nn.Module, Any]:
        """(model, tokenizer or None) on the meta device, reading configs and tokenizers only. Files a
        template recipe names but a fresh clone lacks fall back to the preset's shape, with a line in
        ``notes``."""

    def check_data_section(self, model: nn.Module, data: DataConfig, source: str | None) -> None:
        """UserError when the recipe's data section cannot feed the model built (e.g. its image size)."""

    def apply_perf(
        self, vlm: nn.Module, recipe: Recipe, cuda: bool, mode: str
    ) -> tuple[PerfSection, list[str]]:
        """Resolve the recipe's ``perf`` section for this model and apply it; (resolved section, notes)."""

    def sample_builder(self, data: DataConfig, tokenizer: Any, vlm: nn.Module) -> Any:
        """How the data pipeline turns a record into a sample for this model (data.sample_builder)."""

    def step_flops(self, vlm: nn.Module, recipe: Recipe, adapters: dict[str, int]) -> StepFlops:
        """The model FLOPs of a training step (MFU), for what trains."""

    def reference_flops(self, vlm: nn.Module, vision: bool) -> StepFlops:
        """The FLOPs of DPO's reference forward (MFU); ``vision``: with its own vision tower's encoding."""

    def plan_shape(self, vlm: nn.Module, data: DataConfig) -> ModelShape:
        """What train.plan's memory model needs of the model (a meta-device one will do) beyond its parameter
        counts: the LLM's and vision tower's shapes, one image's patches and tokens (for ``data``), the
        forward FLOPs by part."""


class QwenVL:
    """The Qwen-VL recipe's own model (models.VLM): vision tower + resampler + any Hugging Face causal LM,
    from a preset, an LLM directory (and OpenCLIP weights), or any export of a previous stage."""

    def tokenizer(self, m: ModelSection) -> Any:
        # tokenizer_path, else the init_from export's (a LoRA run's final/: its adapter's, or its base's),
        # else the LLM's; with the VLM special tokens added as build_vlm adds them.
        path = m.tokenizer_path or m.llm_path
        if m.tokenizer_path is None and m.init_from is not None:
            path = export_config_and_tokenizer(m.init_from)[1]
        if path is None:
            raise UserError(
                "the recipe names no tokenizer: set model.tokenizer_path (or model.init_from / "
                "model.llm_path)"
            )
        if not Path(path).is_dir():
            raise UserError(f"tokenizer directory not found: {path}")
        tokenizer = load_tokenizer(path)
        ensure_special_tokens(tokenizer)
        return tokenizer

    def image_tokens(self, m: ModelSection) -> int:
        # The init_from export's config, else the preset's (the Qwen-VL shape: 256).
        if m.init_from is not None:
            return export_config_and_tokenizer(m.init_from)[0].num_image_tokens
        return preset(m)(vocab_size=1).num_image_tokens

    def build(
        self,
        m: ModelSection,
        dtype: torch.dtype | None,
        device: torch.device | None,
        keep_fp32,
        llm_on_meta: bool,
    ) -> tuple[nn.Module, Any]:
        if m.init_from is not None:
            # Any export: a full one, a LoRA run's final/ (its adapter merged into its base here), ...
            model, tokenizer = load_pretrained(
                m.init_from,
                dtype=dtype or torch.float32,
                device=device,
                merge=True,
                tokenizer=m.tokenizer_path,
                keep_fp32=keep_fp32,
            )
            model.train()  # load_pretrained hands out models for inference
        else:
            tokenizer = load_tokenizer(m.tokenizer_path or m.llm_path)
            config = preset(m)(vocab_size=max(len(tokenizer), m.pad_vocab_to or 0))
            openclip = (m.openclip_name, m.openclip_checkpoint) if m.openclip_name else None
            # Weights read from disk (llm_path, OpenCLIP) are copied in on the CPU; only random ones move.
            on = device if m.llm_path is None and m.openclip_name is None else None
            # Q-LoRA builds the decoder on the meta device: quantize_llm_4bit creates it layer by layer.
            llm_device = "meta" if llm_on_meta and on is not None and on.type == "cuda" else None
            model = build_vlm(
                config,
                tokenizer=tokenizer,
                llm_path=m.llm_path,
                openclip=openclip,
                dtype=dtype,
                device=on,
                keep_fp32=keep_fp32,
                llm_device=llm_device,
            )
        if m.image_size is not None:
            model.config.vision.image_size = m.image_size  # the position table is resized on the fly
        model.tokenizer = tokenizer
        return model, tokenizer

    def build_meta(self, m: ModelSection, source: str, notes: list[str]) -> tuple[nn.Module, Any]:
        config, tokenizer = self._meta_config(m, source, notes)
        if tokenizer is None and config.image_pad_id is None:
            vocab = int(config.text_config["vocab_size"])  # any ids: they only matter for real batches
            config.image_start_id, config.image_end_id, config.image_pad_id = vocab - 3, vocab - 2, vocab - 1
        model = build_vlm(config, tokenizer=tokenizer, device="meta")
        if m.image_size is not None:
            model.config.vision.image_size = m.image_size
        return model, tokenizer

    def _meta_config(self, m: ModelSection, source: str, notes: list[str]) -> tuple[VLMConfig, Any]:
        """(VLMConfig, tokenizer or None) as ``build`` resolves them, from configs and tokenizers only."""
        if m.init_from is not None:
            config_file = Path(m.init_from) / "config.json"
            if config_file.is_file():
                try:
                    config = VLMConfig.load(config_file)
                except ValueError as e:
                    raise UserError(f"{source}: model.init_from: {e}") from e
                return config, None  # an export's vocabulary is final: the trainer resizes nothing
            notes.append(
                f"model.init_from={m.init_from} has no config.json yet: planned with the "
                f"{m.preset or DEFAULT_PRESET} preset (the shape the shipped recipes train)"
            )
        tokenizer = _tokenizer_if_present(m.tokenizer_path or m.llm_path, notes)
        text_config = None
        if m.llm_path is not None and (Path(m.llm_path) / "config.json").is_file():
            text_config = AutoConfig.from_pretrained(m.llm_path, trust_remote_code=False).to_dict()
        elif m.llm_path is not None:
            notes.append(
                f"no LLM config at model.llm_path={m.llm_path}: planned with the "
                f"{m.preset or DEFAULT_PRESET} decoder"
            )
        vocab = len(tokenizer) if tokenizer is not None else None
        if text_config is not None:
            vocab = max(vocab or 0, text_config["vocab_size"])
        vocab = max(vocab or 0, m.pad_vocab_to or 0) or None
        if vocab is None and (m.preset or DEFAULT_PRESET) in ("tiny", "demo"):
            vocab = SYNTHETIC_VOCAB
            notes.append(f"vocabulary {vocab} assumed (data.synthetic's tokenizer); set model.tokenizer_path")
        config = preset(m)(vocab_size=vocab) if vocab is not None else preset(m)()
        if text_config is not None:
            config.text_config = text_config
        return config, tokenizer

    def check_data_section(self, model: nn.Module, data: DataConfig, source: str | None) -> None:
        check_image_size(model, data.image_size, source)

    def apply_perf(
        self, vlm: nn.Module, recipe: Recipe, cuda: bool, mode: str
    ) -> tuple[PerfSection, list[str]]:
        perf, notes = resolve_perf(
            recipe.perf,
            vlm,
            cuda=cuda,
            quantized=recipe.quantization.enabled,
            zero3=mode == "zero3",
            adapter_off_reference=runs_adapter_off_reference(recipe),
        )
        apply_perf_switches(vlm, perf)
        return perf, notes

    def sample_builder(self, data: DataConfig, tokenizer: Any, vlm: nn.Module) -> SampleBuilder:
        return SampleBuilder(tokenizer, vlm.config.num_image_tokens, data)

    def step_flops(self, vlm: nn.Module, recipe: Recipe, adapters: dict[str, int]) -> StepFlops:
        vision_adapters = sum(size for n, size in adapters.items() if ".vision.blocks." in n)
        return step_flops(
            vlm.config,
            vision_trains=recipe.freeze.vision == "train",
            resampler_trains=recipe.freeze.resampler == "train",
            llm_trains=recipe.freeze.llm == "train",
            lora_params=sum(adapters.values()) - vision_adapters,
            vision_lora_params=vision_adapters,
        )

    def reference_flops(self, vlm: nn.Module, vision: bool) -> StepFlops:
        return forward_flops(vlm.config, vision=vision)

    def plan_shape(self, vlm: nn.Module, data: DataConfig) -> ModelShape:
        config, vc = vlm.config, vlm.config.vision
        dims = Dims(
            **decoder_dims(config.text_config),
            vit_width=vc.width,
            vit_mlp=vc.mlp_dim,
            vit_layers=vc.layers,
            patches=vc.num_patches,
            queries=config.num_image_tokens,
        )
        return ModelShape(
            dims=dims,
            flops=qwen_vl_forward_parts(config),
            image=f"{vc.image_size} px",
            vision_blocks="vision.blocks",
            # train.perf.resolve_perf: liger's kernels (or compiled layers fusing the same work) for Qwen2
            liger_kernels=config.text_config.get("model_type") == "qwen2",
        )


# The speed switches not yet applied to an HF family, and why (HFFamily.apply_perf).
FAMILY_SWITCHES_OFF = {
    "liger_kernels": "liger-kernel's Qwen2-VL, Qwen2.5-VL and Qwen3-VL entry points fail to import with "
    "transformers 5 (liger-kernel 0.8.5)",
    # transformers checkpoints a ViT block inside its forward: compiled, the checkpoint would sit inside the
    # graph, the nesting inductor crashed on (models.decoder_layers).
    "compile_vision": "the ViT blocks are transformers', checkpointed inside their compiled forward",
    "fuse_frozen_projections": "its fused q/k/v and gate/up products are verified on the Qwen-VL decoder",
}


class HFFamily:
    """A Hugging Face VLM family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: models.families) built with transformers'
    own classes: from a ``<family>_*`` preset (random weights) or ``model.init_from`` (a released HF
    directory as it is, or any export of a previous stage: full, adapter, merged).

    The text side is the family's processor (tokenizer, chat template, image processor): the init_from
    directory's, else ``model.tokenizer_path``, a directory holding one or the Qwen ``qwen.tiktoken`` ranks
    file it is rebuilt from offline (models.families.processor). The model carries it (``processor``) and
    saves it beside its weights on export."""

    def __init__(self, spec: FamilySpec):
        self.spec = spec

    @property
    def released_preset(self) -> str:
        """The preset of the family's released shape (qwen2_5_vl_7b ...): what its shipped recipes train."""
        return next(
            n for n, (spec, _) in FAMILY_PRESETS.items() if spec is self.spec and not n.endswith("_tiny")
        )

    def tokenizer(self, m: ModelSection) -> Any:
        """The family's processor (its ``tokenizer`` attribute is the text tokenizer)."""
        path = m.tokenizer_path
        if path is None and m.init_from is not None:
            path = export_config_and_tokenizer(m.init_from)[1]
        if path is None:
            raise UserError(
                f"the recipe names no {self.spec.name} processor: set model.init_from (an HF directory) or "
                "model.tokenizer_path (a directory holding the processor, or the qwen.tiktoken file)"
            )
        path = Path(path)
        if path.is_file():
            return build_family_processor(self.spec, path)
        return load_family_processor(path)

    def image_tokens(self, m: ModelSection) -> None:
        return None  # each image its own grid's (data.hf_encode.image_grid)

    def build(
        self,
        m: ModelSection,
        dtype: torch.dtype | None,
        device: torch.device | None,
        keep_fp32,
        llm_on_meta: bool,
    ) -> tuple[nn.Module, Any]:
        if m.init_from is not None:
            # A released directory or any export (an adapter is merged into its base here).
            model, processor = load_pretrained(m.init_from, dtype=dtype or torch.float32, device=device)
            if not isinstance(model, HFFamilyModel) or model.spec is not self.spec:
                found = getattr(getattr(model, "spec", None), "name", "qwen_vl")
                raise UserError(f"model.init_from={m.init_from} is a {found} model, not {self.spec.name}")
            model.train()  # load_pretrained hands out models for inference
            if m.tokenizer_path is not None:
                processor = self.tokenizer(m)
        else:
            processor = self.tokenizer(m)
            model = self._preset_model(m.preset, processor, dtype=dtype or torch.float32, device=device)
        if keep_fp32 is not None:
            for module in keep_fp32(model):
                module.float()  # the optimiser's master weights
        model.processor = processor
        return model, processor

    def build_meta(self, m: ModelSection, source: str, notes: list[str]) -> tuple[nn.Module, Any]:
        config_file = Path(m.init_from or "") / "config.json"
        processor = None
        with contextlib.suppress(UserError, OSError):  # a template recipe's files may not exist yet
            processor = self.tokenizer(m)
        if m.init_from is not None and config_file.is_file():
            model_type = _read_json_file(config_file, source).get("model_type")
            if model_type != self.spec.model_type:
                raise UserError(
                    f"{source}: model.init_from={m.init_from} holds a {model_type} model, but model.family "
                    f"is {self.spec.name}"
                )
            config = AutoConfig.from_pretrained(m.init_from, trust_remote_code=False)
            with torch.device("meta"):
                return HFFamilyModel(self.spec, self.spec.model_class(config)), processor
        # A template recipe's init_from (a released directory not downloaded yet): its released shape
        name = m.preset or (self.released_preset if m.init_from is not None else f"{self.spec.name}_tiny")
        if m.init_from is not None:
            notes.append(f"model.init_from={m.init_from} has no config.json yet: planned as {name}")
        return self._preset_model(name, processor, device="meta"), processor

    def _preset_model(
        self,
        name: str,
        processor: Any,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> HFFamilyModel:
        """A preset for the processor's tokenizer. The released vocabulary keeps the preset's released ids and
        embedding rows (its shape and parameter count); another (a tiny test vocabulary) gets its own ids
        and one row per token."""
        tokenizer = processor.tokenizer if processor is not None else None
        released = family_preset(name)[1]
        if tokenizer is not None and (
            len(tokenizer) <= released.text_config.vocab_size
            and tokenizer.convert_tokens_to_ids(processor.image_token) == released.image_token_id
        ):
            tokenizer = None
        return HFFamilyModel.from_preset(name, dtype=dtype, device=device, tokenizer=tokenizer)

    def check_data_section(self, model: nn.Module, data: DataConfig, source: str | None) -> None:
        if data.min_pixels is not None and data.max_pixels is not None and data.min_pixels > data.max_pixels:
            raise UserError(
                f"{source or 'recipe'}: data.min_pixels ({data.min_pixels}) exceeds data.max_pixels "
                f"({data.max_pixels})"
            )

    def apply_perf(
        self, vlm: nn.Module, recipe: Recipe, cuda: bool, mode: str
    ) -> tuple[PerfSection, list[str]]:
        """Resolved as for the Qwen-VL model (train.perf.resolve_perf: the same "auto" rules and log lines),
        then applied to the family's modules: the loss implementation, attention (the LLM's only), FP8 of the
        frozen linears (opt-in, not loss-equal, as for the Qwen-VL model), compiled decoder layers and fused
        LoRA forwards, each pinned on the families' own layer classes (tests/test_perf_families.py). The
        switches in ``FAMILY_SWITCHES_OFF`` stay off: "auto" with a note, an explicit true is an error."""
        requested, off, notes = recipe.perf, {}, []
        for key, why in FAMILY_SWITCHES_OFF.items():
            value = getattr(requested, key)
            if value is True:
                raise UserError(f"perf.{key} is not available for model.family {self.spec.name} yet: {why}")
            if value == "auto":
                notes.append(f"perf.{key}: off for {self.spec.name} ({why})")
            off[key] = False
        perf, resolved_notes = resolve_perf(
            dataclasses.replace(requested, **off),
            vlm,
            cuda=cuda,
            quantized=recipe.quantization.enabled,
            zero3=mode == "zero3",
            adapter_off_reference=runs_adapter_off_reference(recipe),
        )
        vlm.loss_impl, vlm.loss_at_label_positions = perf.loss_impl, perf.loss_at_label_positions
        if perf.fp8:  # before the LoRA forwards are fused and layers compile, as in apply_perf_switches
            # torchao is an optional heavy dependency (the gpu extra): models.fp8 imports it.
            from models.fp8 import convert_frozen_linears

            convert_frozen_linears(vlm)
        if perf.attention == "varlen":
            # Registers the kernel (the LLM's "varlen" below) and runs the ViT through it too: one call per
            # block over every image's own boundaries (its windows', in Qwen2.5-VL's windowed blocks), where
            # its SDPA path runs one call per image after a host sync.
            set_vision_varlen(vlm.hf.model.visual.config)
        vlm.hf.model.language_model.set_attn_implementation(perf.attention)
        torch.backends.cuda.enable_cudnn_sdp(perf.cudnn_attention)  # process-wide, as apply_perf_switches
        if perf.fused_lora:
            # Before compilation, which would trace the forwards it finds; compiled layers keep peft's forward
            # (inductor fuses its element-wise work), as in apply_perf_switches.
            fuse_lora_forwards(vlm.hf.model.visual)
            if not perf.compile_llm:
                fuse_lora_forwards(vlm.hf.model.language_model)
        if perf.compile_llm:
            vlm.compile_llm_layers()
        return perf, notes + resolved_notes

    def sample_builder(self, data: DataConfig, tokenizer: Any, vlm: nn.Module | None) -> FamilySampleBuilder:
        # Needs no model: the data check builds the same samples before any weights exist (vlm None).
        return FamilySampleBuilder(
            tokenizer, self.spec.box_convention, data, mrope=getattr(vlm, "mrope", None)
        )

    def step_flops(self, vlm: nn.Module, recipe: Recipe, adapters: dict[str, int]) -> StepFlops:
        return llm_step_flops(
            vlm.config.text_config.to_dict(),
            llm_trains=recipe.freeze.llm == "train",
            lora_params=sum(n for name, n in adapters.items() if ".language_model." in name),
        )

    def reference_flops(self, vlm: nn.Module, vision: bool) -> StepFlops:
        return llm_forward_flops(vlm.config.text_config.to_dict())

    def plan_shape(self, vlm: nn.Module, data: DataConfig) -> ModelShape:
        """Planned at the largest image the data section admits: data.max_pixels (else the released
        processor's) gives at most max_pixels / (patch x merge)^2 LLM tokens, 4 ViT patches each (2x2 merge),
        and no more than a sample holds (data.max_len with the image's two span tokens)."""
        config, vc = vlm.config, vlm.config.vision_config
        text = config.text_config.to_dict()
        max_pixels = data.max_pixels or self.spec.max_pixels
        merge = vc.spatial_merge_size**2
        tokens = max(1, min(max_pixels // self.spec.resize_factor**2, data.max_len - 2))
        patches = tokens * merge
        block = vlm.hf.model.visual.blocks[0]
        # Qwen2-VL's vision hidden_size is the LLM's width (its merger's output); its ViT width is embed_dim
        width = block.norm1.weight.shape[0]
        mlp_linears = [m for m in block.mlp.modules() if isinstance(m, nn.Linear)]  # 2: GELU, 3: SwiGLU
        mlp = mlp_linears[0].out_features
        # Qwen2.5-VL: window attention (window_size px of the resized image) except in fullatt_block_indexes
        full_layers = getattr(vc, "fullatt_block_indexes", None)
        window = min(patches, (vc.window_size // vc.patch_size) ** 2) if full_layers is not None else patches
        attended = [patches if full_layers is None or i in full_layers else window for i in range(vc.depth)]
        mergers = 1 + len(getattr(vc, "deepstack_visual_indexes", None) or [])
        merged = merge * width  # a merger's input: 2x2 patches side by side
        projector = mergers * 2 * tokens * (merged * merged + merged * text["hidden_size"])
        patch_inputs = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        vision = vit_forward_flops(patches, width, mlp, len(mlp_linears), patch_inputs, attended)
        flops = forward_parts(text, patches, projector, vision)
        dims = Dims(
            **decoder_dims(text),
            vit_width=width,
            vit_mlp=mlp,
            vit_layers=vc.depth,
            patches=patches,
            queries=tokens,
            mergers=mergers,
        )
        return ModelShape(
            dims=dims,
            flops=flops,
            image=f"up to {max_pixels:,} pixels ({tokens:,} tokens, {patches:,} patches; data.max_pixels)",
            vision_blocks="hf.model.visual.blocks",
            liger_kernels=False,  # HFFamily.apply_perf: liger's kernels do not cover the families yet
        )


FAMILIES: dict[str, ModelFamily] = {
    "qwen_vl": QwenVL(),
    **{name: HFFamily(spec) for name, spec in FAMILY_SPECS.items()},
}


def family_of(m: ModelSection) -> ModelFamily:
    return FAMILIES[m.family]  # the recipe's Literal type admits only registered names


def preset(m: ModelSection):
    """The models.presets builder the model section names (the Qwen-VL 7B shape by default)."""
    return getattr(presets, m.preset or DEFAULT_PRESET)


def _read_json_file(path: Path, source: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{source}: {path}: malformed JSON at line {e.lineno}: {e.msg}") from e


def _tokenizer_if_present(path: str | None, notes: list[str]) -> Any:
    if path is None:
        return None
    p = Path(path)
    if not (p / "tokenizer_config.json").is_file() and not (p / "tokenizer.json").is_file():
        notes.append(f"no tokenizer at {path}: vocabulary from the config / preset")
        return None
    return load_tokenizer(p)


# ------------------------------------------------------------------------------------------ assembly
def storage_dtypes(recipe: Recipe) -> tuple[torch.dtype | None, bool]:
    """(dtype the model is built or loaded in, whether its trainable modules are kept in fp32).

    - DeepSpeed in bf16 casts the whole module to bf16 and keeps its own fp32 master weights: build in bf16
      (building in fp32 first would only double each rank's memory).
    - Otherwise with train.bf16 and perf.frozen_bf16: frozen weights in bf16 (autocast runs their matmuls in
      bf16 anyway, and they never update) and trainable ones in fp32 for the optimiser, each loaded straight
      in its final dtype: the model never exists in fp32 as a whole (a 9.65B fp32 model is 36 GiB).
    - Otherwise fp32 (None)."""
    if recipe.parallel.mode in ("zero2", "zero3") and recipe.train.bf16:
        return torch.bfloat16, False
    if recipe.train.bf16 and recipe.perf.frozen_bf16:
        return torch.bfloat16, True
    return None, False


def build_model(recipe: Recipe, device: torch.device | None = None) -> tuple[nn.Module, Any]:
    """The model and its tokenizer in the storage dtypes of ``storage_dtypes``, before freezing. ``device``:
    where weights are drawn (a preset's random ones: a GPU draws 9.65B in seconds, one CPU thread under
    torchrun takes minutes) or loaded (an export's)."""
    dtype, trainable_fp32 = storage_dtypes(recipe)
    keep_fp32 = (lambda vlm: trainable_modules(vlm, recipe.freeze)) if trainable_fp32 else None
    return family_of(recipe.model).build(
        recipe.model, dtype=dtype, device=device, keep_fp32=keep_fp32, llm_on_meta=recipe.quantization.enabled
    )


def assemble(
    recipe: Recipe, device: torch.device | str | None, mode: str = "single", source: str | None = None
) -> Assembled:
    """The recipe's model, ready for the engine. ``device``: where the trainer runs (weights go straight
    there where they can), or ``"meta"``: the same model without memory, weights or speed switches, for
    the planner's counts. ``mode``: the resolved parallel mode (train.parallel.resolve_mode). ``source``:
    the recipe file, named in errors."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    meta = device.type == "meta"
    family, notes = family_of(recipe.model), []
    if meta:
        model, tokenizer = family.build_meta(recipe.model, source or "recipe", notes)
    else:
        # Straight onto the GPU in the final dtypes; ZeRO-3 loads an export on the CPU (it partitions it), and
        # so does Q-LoRA (quantize_llm_4bit moves the decoder over one layer at a time).
        cuda = device.type == "cuda"
        on_gpu = cuda and (
            recipe.model.init_from is None or (mode != "zero3" and not recipe.quantization.enabled)
        )
        model, tokenizer = build_model(recipe, device=device if on_gpu else None)
    family.check_data_section(model, recipe.data, source)
    trains = apply_freezing(model, recipe.freeze)
    if not meta and recipe.train.grad_checkpointing:
        model.set_gradient_checkpointing(
            True, llm_layers=recipe.perf.checkpoint_llm_layers, vision=recipe.perf.checkpoint_vision
        )
    if not meta and recipe.quantization.enabled:
        quantize_llm_4bit(model, recipe.quantization, device)
    wrapped = model
    if recipe.lora.enabled:
        # On the meta device the adapters are built there too: no memory, no random init.
        with torch.device("meta") if meta else contextlib.nullcontext():
            try:
                wrapped = apply_lora(model, recipe.lora, recipe.freeze, recipe.train.grad_checkpointing)
            except ValueError as e:  # peft: a target matches no module
                raise UserError(f"{source or 'recipe'}: {e}") from e
    vlm = wrapped.get_base_model() if recipe.lora.enabled else wrapped
    adapters = {n: p.numel() for n, p in wrapped.named_parameters() if "lora_" in n}
    if meta:
        return Assembled(wrapped, vlm, tokenizer, trains, adapters, perf=None, notes=notes)
    if storage_dtypes(recipe) == (torch.bfloat16, True):
        frozen_to_bf16(vlm)  # what quantisation / LoRA wrapping left in fp32 while frozen
    perf, notes = family.apply_perf(vlm, recipe, cuda=device.type == "cuda", mode=mode)
    return Assembled(wrapped, vlm, tokenizer, trains, adapters, perf=perf, notes=notes)


def check_image_size(model: nn.Module, image_size: int, source: str | None = None) -> None:
    if model.config.vision.image_size != image_size:
        where = f"{source}: " if source else ""
        raise UserError(
            f"{where}data.image_size={image_size} but the model's vision.image_size is "
            f"{model.config.vision.image_size}; set model.image_size and data.image_size alike"
        )
