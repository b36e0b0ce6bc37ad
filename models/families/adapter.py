"""`HFFamilyModel`: a Hugging Face VLM (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) behind the interface the recipe uses.

The model itself is transformers' own class (``Qwen2_5_VLForConditionalGeneration`` ...), built from a preset
or loaded from a released directory as it is, never with remote code. The adapter adds what the recipe
needs to know and the model does not say in one place:

* its parts, for freezing and LoRA: ``module_groups()`` has the keys train.freeze reads for the Qwen-VL
  family (vision, resampler, llm, embeddings; "resampler" is the family's merger/projector), and
  ``part_prefixes()`` / ``lora_target_pattern()`` name them by parameter-name prefix;
* its image placeholder span: ``placeholder`` (vision_start, image_pad, vision_end ids, from the config);
* its position ids: ``mrope`` (models.families.mrope.MRope) runs the model class's own ``get_rope_index``
  (M-RoPE, 3 rows) on padded rows, per sample in a packed row.

``forward`` takes the batches of data.hf_encode samples, padded or packed, and returns ``VLMOutput`` with the
loss summed by models.loss, as the Qwen-VL ``VLM`` does.

Every family uses the same module layout (reference 6.2): ``model.visual`` (patch_embed, [pos_embed], blocks,
merger, [deepstack_merger_list]), ``model.language_model``, ``lm_head``; so one class serves them all.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.attention import varlen_kwargs
from models.decoder_layers import compile_layers, install_checkpointing, installed, set_decoder_checkpointing
from models.errors import MissingFileError, UserError
from models.families.mrope import ImagePlaceholder, MRope
from models.families.specs import FamilySpec, family_of_model_type, preset
from models.manifest import write_manifest
from models.vlm import VLMOutput, lm_output

# Children of model.visual that project ViT features into the LLM (the "resampler" group). Everything else
# under model.visual is the vision tower. Qwen3-VL's DeepStack mergers project features of middle layers.
PROJECTOR_CHILDREN = ("merger", "deepstack_merger_list")


# ``forward`` hands the vision tower's features to transformers' model as ``mm_encoder_outputs``, an argument
# transformers added in 5.18: an older release ignores it, and the images' tokens would train on nothing
# (under 5.17 the vision parameters got no gradient). The tests run on what the README's install resolves.
MIN_TRANSFORMERS = "5.18"


def require_transformers(spec: FamilySpec) -> None:
    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise UserError(
            f"model.family {spec.name} needs transformers>={MIN_TRANSFORMERS} (found "
            f"{transformers.__version__}): pip install -U transformers"
        )


class HFFamilyModel(nn.Module):
    """A transformers VLM of a supported family (``self.hf``), with its parts, placeholder and position ids
    named. An nn.Module, so the trainer, train.freeze and peft take it as they take the Qwen-VL ``VLM``;
    parameter names are the HF ones under ``hf.`` (``hf.model.visual.merger...``)."""

    # peft treats a module whose ``config`` has a model_type as a transformers model and asks for its
    # base_model_prefix (to scope transformers' checkpoint key conversions);
    # the adapter has no prefix of its own.
    base_model_prefix = ""

    def __init__(self, spec: FamilySpec, hf_model: PreTrainedModel):
        if not isinstance(hf_model, spec.model_class):
            raise TypeError(f"{spec.name} wraps {spec.model_class.__name__}, got {type(hf_model).__name__}")
        require_transformers(spec)
        super().__init__()
        self.spec = spec
        self.hf = hf_model
        # M-RoPE positions, by the model class's own method on the config alone: the trainer's collator
        # computes them in DataLoader workers with this same object (data.collate.Collator.mrope).
        self.mrope = MRope(type(hf_model.model), hf_model.config)
        self.loss_impl = (
            "torch"  # models.loss: "torch" | "chunked" | "liger" | "auto", as VLM.runtime.loss_impl
        )
        # The LM head and loss only at the supervised positions the collator ships (label_positions), as
        # VLM.runtime.loss_at_label_positions; False: the full-logit loss (train.bench's plain anchor).
        self.loss_at_label_positions = True
        # The processor training used (train.assemble attaches it): saved beside the weights, as VLM saves its
        # tokenizer, so an export is a whole HF directory for AutoProcessor and eval_mm.
        self.processor = None

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_preset(
        cls,
        name: str,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> HFFamilyModel:
        """Random weights in a preset's shape (``qwen2_5_vl_tiny``, ``qwen2_5_vl_7b``, ...; see
        specs.PRESETS). ``device="meta"`` builds the shape without memory (parameter counts, planning).
        ``tokenizer``: the family tokenizer the model will read, when not the released one (its token ids,
        one row per token)."""
        spec, config = preset(name, tokenizer)
        # Drawn straight in ``dtype`` (transformers' own constructor sets torch's default dtype around the
        # build): built in fp32 and then cast, a 7B preset first takes 31 GiB, which an H100 run measured as
        # the whole run's peak, and which a 24 GiB card cannot hold at all.
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = spec.model_class._from_config(config, dtype=dtype)
        return cls(spec, model)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None) -> HFFamilyModel:
        """A released HF directory as it is (e.g. Qwen2.5-VL-7B-Instruct), or one ``save_pretrained`` wrote.

        The family comes from config.json's model_type; weights load from safetensors only, with transformers'
        own key mapping for older checkpoints (``visual.*`` -> ``model.visual.*``); no remote code runs.
        ``dtype=None`` keeps the checkpoint's dtype.
        """
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise MissingFileError(f"{path}: no config.json; expected a Hugging Face model directory")
        try:
            model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        except json.JSONDecodeError as e:
            raise UserError(f"{config_file}: malformed JSON at line {e.lineno}: {e.msg}") from e
        spec = family_of_model_type(model_type, str(config_file))
        model = spec.model_class.from_pretrained(
            path, dtype=dtype if dtype is not None else "auto", use_safetensors=True, trust_remote_code=False
        )
        return cls(spec, model)

    def save_pretrained(
        self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None, manifest: bool = True
    ) -> None:
        """An HF directory that ``from_pretrained`` and ``AutoModelForImageTextToText`` load (safetensors),
        with the attached processor and, last, the project's manifest (models.manifest), as ``VLM`` writes.

        ``state_dict``: this module's names (``hf.`` ...), e.g. gathered from ZeRO-3 shards;
        ``manifest=False`` leaves the manifest to a caller that adds files of its own
        (train.checkpoint.export_final)."""
        if state_dict is not None:
            state_dict = {name.removeprefix("hf."): tensor for name, tensor in state_dict.items()}
        self.hf.save_pretrained(path, state_dict=state_dict)
        if self.processor is not None:
            self.processor.save_pretrained(path)
        if manifest:
            write_manifest(Path(path))

    # ------------------------------------------------------------------------------ parts
    @property
    def config(self):
        return self.hf.config

    def module_groups(self) -> dict[str, list[nn.Module]]:
        """Groups for freezing, with train.freeze's keys. "embeddings" (input embeddings + LM head) is a
        subset of "llm", listed apart because it must train when tokens were added."""
        visual = self.hf.model.visual
        parts = [(name, m) for name, m in visual.named_children() if any(True for _ in m.parameters())]
        return {
            "vision": [m for name, m in parts if name not in PROJECTOR_CHILDREN],
            "resampler": [m for name, m in parts if name in PROJECTOR_CHILDREN],
            "llm": [self.hf.model.language_model, self.hf.lm_head],
            "embeddings": [self.hf.get_input_embeddings(), self.hf.get_output_embeddings()],
        }

    @property
    def llm(self) -> PreTrainedModel:
        """Where the trainer reaches the LLM's embeddings, head and decoder (``get_input_embeddings``,
        ``get_output_embeddings``, ``get_decoder``, ``enable_input_require_grads``), as on ``VLM.llm``: here
        the HF model itself, which holds them (its decoder is ``model.language_model``)."""
        return self.hf

    def set_gradient_checkpointing(
        self, enabled: bool = True, llm_layers: int | None = None, vision: bool = True
    ) -> None:
        """Recompute the ViT blocks and LLM decoder layers in backward (non-reentrant), as ``VLM`` does.
        ``llm_layers``: how many decoder layers to checkpoint (None = all), spread evenly over the depth;
        ``vision``: whether the ViT blocks are recomputed too. The decoder layers run as the Qwen-VL model's
        do (models.decoder_layers: a frozen down projection is not recomputed); the ViT blocks as transformers
        checkpoints them."""
        set_decoder_checkpointing(self.hf, enabled, llm_layers)
        if enabled:
            # transformers then makes every sub-model's input embedding output require grad, the ViT's patch
            # embedding too: a frozen ViT would record its graph, keep its blocks' inputs and run its backward
            # for nothing. Non-reentrant checkpoints need no such hook; LoRA adds the LLM's own (train.lora).
            self.hf.disable_input_require_grads()
        for block in self.hf.model.visual.blocks:
            block.gradient_checkpointing = enabled and vision

    def compile_llm_layers(self, backend: str = "inductor") -> None:
        """torch.compile the decoder layers as ``VLM.compile_blocks(llm=True)`` does: the layers that
        models.decoder_layers runs (every family's) compile their parts outside the checkpoint, one graph for
        all layers; packed rows' changing lengths are traced once with a dynamic length."""
        layers = list(self.hf.get_decoder().layers)
        for layer in layers:
            if not installed(layer):  # checkpointing off: the same forward, never checkpointed
                install_checkpointing(layer, False)
        compile_layers(layers, backend)

    def fp8_parts(self) -> dict[str, nn.Module]:
        """What ``perf.fp8`` converts (models.fp8): the decoder layers and the ViT's blocks, as on the
        Qwen-VL model; not the merger (it trains in every shipped stage) nor the LM head."""
        return {"decoder": self.hf.get_decoder().layers, "vision": self.hf.model.visual.blocks}

    def part_prefixes(self) -> dict[str, tuple[str, ...]]:
        """{group: parameter-name prefixes} of ``module_groups`` (names as ``model.named_parameters()``
        gives them, e.g. ``hf.model.visual.merger.``). Every parameter is under exactly one of vision,
        resampler and llm (pinned in tests)."""
        names = {id(module): name for name, module in self.named_modules()}
        return {
            group: tuple(names[id(m)] + "." for m in modules)
            for group, modules in self.module_groups().items()
        }

    def lora_target_pattern(self, targets: list[str], vision_targets: list[str] = ()) -> str:
        """peft's ``target_modules`` regex: ``targets`` (leaf names such as q_proj) only inside the LLM's
        decoder, ``vision_targets`` (paths inside a block such as attn.qkv) only inside the ViT's blocks.
        Qwen2.5-VL's vision MLP has the LLM's leaf names (gate_proj, up_proj, down_proj): without the
        prefixes, LoRA on the LLM would also adapt the ViT."""
        names = {id(module): name for name, module in self.named_modules()}
        llm = re.escape(names[id(self.hf.model.language_model)] + ".")
        pattern = rf"{llm}.*\.({'|'.join(map(re.escape, targets))})"
        if vision_targets:
            blocks = re.escape(names[id(self.hf.model.visual)] + ".") + r"blocks\.\d+\."
            pattern += rf"|{blocks}({'|'.join(map(re.escape, vision_targets))})"
        return rf"^({pattern})$"

    # ------------------------------------------------------------------------------ image span, positions
    @property
    def placeholder(self) -> ImagePlaceholder:
        return self.mrope.placeholder

    @property
    def spatial_merge_size(self) -> int:
        return self.hf.config.vision_config.spatial_merge_size

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seq_lens: torch.Tensor | None = None,
        max_length: int | None = None,
        return_token_logps: bool = False,
        label_positions: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> VLMOutput:
        """Loss (or logits without labels) of a batch: padded rows with ``attention_mask``, or packed rows
        (``attention_mask=None``, ``cu_seq_lens`` and ``max_length`` from data.packing.pack, passed on to
        flash / the project's varlen attention).

        M-RoPE positions are computed here unless ``position_ids`` already has 3 or 4 rows. Images of every
        sample are encoded in one vision call; the ViT keeps each image to itself (its own grid's
        boundaries). ``use_cache=False``: transformers derives the per-sample mask of packed rows from the
        text positions only when there is no cache. ``return_token_logps`` (preference training) and
        ``label_positions`` (the supervised labels' flat positions, data.packing.supervised_positions) mean
        what they mean for ``VLM.forward``. ``image_index`` (a preference pair's rows sharing one encoding of
        its images) is not supported yet: the trainer passes None.
        """
        if image_index is not None:
            raise NotImplementedError(
                "HFFamilyModel does not share image encodings between rows (image_index)"
            )
        packed = attention_mask is None and cu_seq_lens is not None
        if position_ids is None or position_ids.dim() == 2:
            if packed:
                position_ids = self.mrope.packed(input_ids, image_grid_thw, cu_seq_lens)
            else:
                position_ids = self.mrope.padded(input_ids, image_grid_thw, attention_mask)
        # The vision tower runs first, on its own: the sample boundaries below are the LLM's, and keyword
        # arguments given to the HF model would reach the ViT's attention too (it has its own boundaries).
        encoded, unused_vision = None, None
        if pixel_values is not None:
            encoded = {
                "image": self.hf.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
            }
        elif self.training:
            # A text-only training batch runs the ViT here too, before the LLM, where an image batch runs it:
            # ZeRO-3 gathers each module's parameters as it runs, so every rank must run the modules in one
            # order (a rank running the ViT after the LLM while another ran it first breaks the collective).
            unused_vision = self._unused_vision_term()
        varlen = {}
        if packed:  # flash / varlen attention read the boundaries; SDPA and eager ignore them
            cu_seq_lens = cu_seq_lens.to(input_ids.device, non_blocking=True)
            if max_length is None:
                max_length = int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())
            varlen = varlen_kwargs(cu_seq_lens, max_length)
        hidden = self.hf.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            mm_encoder_outputs=encoded,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=self.mrope.mm_token_type_ids(input_ids),
            use_cache=False,
            **varlen,
        ).last_hidden_state
        positions = label_positions if self.loss_at_label_positions else None
        return lm_output(
            hidden,
            self.hf.lm_head,
            labels,
            self.loss_impl,
            positions,
            return_token_logps,
            extra_loss=unused_vision,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Left-padded prompts -> only the new tokens [B, T], as ``VLM.generate`` returns them: the HF model's
        own ``generate`` (its M-RoPE positions from the image grids, the image slots marked by
        ``mm_token_type_ids``). A streamer in ``generate_kwargs`` is handed the prompt first, as HF does."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        images = (
            {}
            if pixel_values is None or not len(pixel_values)
            else {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
        )
        out = self.hf.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **images,
            mm_token_type_ids=self.mrope.mm_token_type_ids(input_ids),
            **generate_kwargs,
        )
        return out[:, input_ids.shape[1] :]

    def _unused_vision_term(self) -> torch.Tensor:
        """0 x the vision outputs of one smallest blank image (2x2 patches, one LLM token): a text-only
        training batch then gives every vision and projector parameter a zero gradient, so DDP and ZeRO see
        the same parameters on every rank and never hang (as the Qwen-VL ``VLM`` does, docs/model.md).
        ``mean`` rather than ``sum``: the zero term cannot overflow in fp16."""
        vision = self.hf.model.visual
        vision_config = self.hf.config.vision_config
        merge = vision_config.spatial_merge_size
        width = vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size**2
        grid = torch.tensor([[1, merge, merge]], device=self.hf.device)
        blank = torch.zeros(merge * merge, width, device=self.hf.device, dtype=vision.dtype)
        outputs = vision(blank, grid_thw=grid, return_dict=True)
        tensors = [
            t
            for value in outputs.values()
            for t in (value if isinstance(value, (list, tuple)) else [value])
            if isinstance(t, torch.Tensor)
        ]
        return sum(t.float().mean() for t in tensors) * 0.0
