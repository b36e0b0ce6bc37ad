"""The VLM: vision tower + resampler + any Hugging Face causal LM, spliced through <imgpad> slots.

See docs/design.md section 1 for the forward contract and docs/model.md for the architecture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.utils import ModelOutput

from models.attention import sample_boundaries_from_position_ids, uses_varlen, varlen_kwargs
from models.config import VLMConfig
from models.decoder_layers import compile_layers, installed, set_decoder_checkpointing
from models.errors import UserError
from models.liger import apply_liger_to
from models.loss import IGNORE_INDEX, causal_lm_loss_sum, causal_lm_token_logps
from models.manifest import write_manifest
from models.resampler import Resampler
from models.vision import VisionTower

SAFETENSORS_INDEX = "model.safetensors.index.json"
MAX_SHARD_SIZE = "5GB"


@contextlib.contextmanager
def frozen_vision_shared(*vlms: VLM) -> Iterator[None]:
    """Inside the block the frozen vision towers of ``vlms`` encode a given ``pixel_values`` tensor once
    between them: DPO's reference and policy forwards of a micro-batch show the same images to towers of
    equal weights (one model's tower, or a frozen copy of it; train.dpo), and the frozen 1.8B ViT is the
    costliest part of a short sequence. A tower that trains runs as usual, adapters in it included (the
    reference's adapter-off pass may store its encoding; the policy's, adapters training, never reads it).
    The encoding is held until the block ends."""
    memo: dict = {}
    for vlm in vlms:
        vlm.shared_vision = memo
    try:
        yield
    finally:
        for vlm in vlms:
            vlm.shared_vision = None


@dataclass
class RuntimeOptions:
    """How the model runs, not what it is: never saved with it. The trainer passes the recipe's resolved
    ``perf`` section here (``VLM.set_runtime``; train/perf.py); every setting computes the same loss.

    The first three are plain flags read at each forward. ``liger_kernels`` and the ``compile_*`` parts are
    applied by ``set_runtime`` and cannot be undone: once on, they stay on (so does ``fp8``)."""

    loss_impl: str = "torch"  # models.loss: "torch" | "chunked" | "liger" | "auto"
    # The image-span check costs one device->host sync per batch; a trainer whose collator built the spans
    # itself may turn it off.
    check_image_spans: bool = True
    # The LM head and loss only at the supervised positions the collator ships (label_positions), when it
    # ships them: the same loss, without the prompt's and image slots' logits.
    loss_at_label_positions: bool = True
    liger_kernels: bool = False  # liger's RMSNorm / SwiGLU / RoPE kernels in a Qwen2 decoder (models.liger)
    compile_vision: bool = False  # torch.compile each vision block (VLM.compile_blocks)
    compile_llm: bool = False  # ... and each decoder layer
    # The frozen linears' products in FP8 (models.fp8, torchao; not loss-equal: docs/training.md).
    fp8: bool = False


@dataclass
class VLMOutput(ModelOutput):
    # A ModelOutput (a dict of its non-None fields) so that DeepSpeed ZeRO-3's module hooks find the
    # tensors inside, as they do for Hugging Face models' outputs.
    loss_sum: torch.Tensor | None = None  # fp32 scalar: sum of token cross-entropies
    num_tokens: torch.Tensor | None = None  # long scalar: supervised tokens
    loss: torch.Tensor | None = None  # loss_sum / num_tokens
    logits: torch.Tensor | None = None  # [B, L, V], only when labels is None
    token_logps: torch.Tensor | None = None  # [B, L] fp32 log-prob of each label, with return_token_logps


def lm_output(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor | None,
    loss_impl: str,
    label_positions: torch.Tensor | None = None,
    return_token_logps: bool = False,
    extra_loss: torch.Tensor | None = None,
) -> VLMOutput:
    """The LM head's part of a forward, for every model (``VLM`` and the families' ``HFFamilyModel``): logits
    without labels; else the summed token loss (models.loss, ``loss_impl``; only at ``label_positions`` when
    given) and its token count, or each label's log-probability (``return_token_logps``: preference
    training). ``extra_loss`` (a zero-valued term that keeps unused parameters in the graph) joins the sum."""
    if labels is None:
        return VLMOutput(logits=lm_head(hidden))
    token_logps = None
    if return_token_logps:
        token_logps = causal_lm_token_logps(hidden, lm_head.weight, labels, impl=loss_impl)
        loss_sum, num_tokens = -token_logps.sum(), (labels[:, 1:] != IGNORE_INDEX).sum()
    else:
        loss_sum, num_tokens = causal_lm_loss_sum(
            hidden, lm_head.weight, labels, impl=loss_impl, label_positions=label_positions
        )
    if extra_loss is not None:
        loss_sum = loss_sum + extra_loss
    return VLMOutput(
        loss_sum=loss_sum,
        num_tokens=num_tokens,
        loss=loss_sum / num_tokens.clamp(min=1),
        token_logps=token_logps,
    )


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, copied when it is a slice of a larger storage (perf.fuse_frozen_projections makes the q/k/v
    and gate/up weights slices of one matrix): safetensors refuses tensors that share memory."""
    return tensor if tensor.untyped_storage().nbytes() == tensor.nbytes else tensor.clone()


class VLM(nn.Module):
    def __init__(self, config: VLMConfig, llm: nn.Module):
        super().__init__()
        for name in ("image_start_id", "image_end_id", "image_pad_id"):
            if getattr(config, name) is None:
                raise ValueError(
                    f"VLMConfig.{name} is unset; build the model with models.build_vlm(config, tokenizer)"
                )
        if getattr(llm.get_output_embeddings(), "bias", None) is not None:
            raise NotImplementedError(
                "LM heads with a bias are not supported by models.loss.causal_lm_loss_sum"
            )
        self.config = config
        self.vision = VisionTower(config.vision)
        self.resampler = Resampler(config.resampler, kv_dim=config.vision.width, dim=config.hidden_size)
        self.llm = llm
        self.tokenizer = None  # attached by build_vlm / models.build.load_vlm; saved with the model
        self.runtime = RuntimeOptions()  # set_runtime; not saved with the model
        self.resampler_checkpointing = False  # set_gradient_checkpointing
        self.shared_vision: dict | None = (
            None  # frozen_vision_shared: one frozen-tower encoding per pixel tensor
        )

    # ----------------------------------------------------------------------------------- images
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[num_images, 3, H, W] -> [num_images, N, d].

        A frozen module runs under no_grad: no autograd graph and no saved activations for it (a frozen
        vision tower under a trainable resampler; both frozen under LoRA on the LLM)."""
        vision_frozen = not any(p.requires_grad for p in self.vision.parameters())
        memo = self.shared_vision if vision_frozen else None
        if memo is not None and memo.get("pixels") is pixel_values:
            patches = memo["patches"]
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not vision_frozen):
                patches = self.vision(pixel_values)
            if memo is not None:
                memo.update(pixels=pixel_values, patches=patches)
        resampler_frozen = vision_frozen and not any(p.requires_grad for p in self.resampler.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not resampler_frozen):
            if self.resampler_checkpointing and self.training and torch.is_grad_enabled():
                # The module itself is checkpointed (not its forward) so that ZeRO-3's hooks gather its
                # parameters for the recompute too.
                return checkpoint(self.resampler, patches, use_reentrant=False)
            return self.resampler(patches)

    def _check_image_spans(self, input_ids: torch.Tensor, num_images: int) -> None:
        """Raise ValueError naming the batch row when image spans and images disagree.

        One small device->host copy per batch: a silent misalignment would train on the wrong image.
        """
        cfg = self.config
        counts = torch.stack(
            [
                (input_ids == cfg.image_start_id).sum(1),
                (input_ids == cfg.image_end_id).sum(1),
                (input_ids == cfg.image_pad_id).sum(1),
            ],
            dim=1,
        ).tolist()
        seen = 0
        for row, (starts, ends, pads) in enumerate(counts):
            if starts != ends or pads != starts * cfg.num_image_tokens:
                raise ValueError(
                    f"batch row {row}: {starts} <img>, {ends} </img> and {pads} <imgpad> tokens; "
                    f"every image must be <img> + {cfg.num_image_tokens} x <imgpad> + </img>"
                )
            seen += starts
            if seen > num_images:
                raise ValueError(
                    f"batch row {row}: image spans up to this row need {seen} images "
                    f"but pixel_values has {num_images}"
                )
        if seen != num_images:
            raise ValueError(
                f"batch row {len(counts) - 1} (last): input_ids hold {seen} image spans but pixel_values has "
                f"{num_images} images"
            )

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the resampler outputs written into the <imgpad> slots. ``image_index``
        ([image spans] long): the row of ``pixel_values`` each span shows, when spans share images (the two
        sequences of a preference pair): each image is then encoded once."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        num_spans = num_images if image_index is None else image_index.shape[0]
        if self.runtime.check_image_spans:
            self._check_image_spans(input_ids, num_spans)
        if num_spans:
            features = self.encode_images(pixel_values).to(embeds.dtype)
            if image_index is not None:
                features = features.index_select(0, image_index)
            slots = (input_ids == self.config.image_pad_id).unsqueeze(-1).expand_as(embeds)
            # Slots are filled in row-major order, which is the order of images in pixel_values.
            embeds = embeds.masked_scatter(slots, features)
        elif self.training:
            # Text-only batch: still run vision + resampler on a dummy image so every parameter gets a
            # (zero) gradient; otherwise DDP / ZeRO ranks disagree and hang (Qwen-VL#179). mean, not
            # sum, so the dummy term cannot overflow in fp16.
            side = self.config.vision.patch_size * self.config.vision.pos_grid  # cheapest: no pos resize
            dummy = torch.zeros(1, 3, side, side, device=embeds.device, dtype=embeds.dtype)
            embeds = embeds + 0.0 * self.encode_images(dummy).mean().to(embeds.dtype)
        return embeds

    # ---------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cu_seq_lens: torch.Tensor | None = None,
        max_length: int | None = None,
        return_token_logps: bool = False,
        label_positions: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> VLMOutput:
        """``cu_seq_lens`` / ``max_length``: the packed samples' boundaries (data.packing.pack) for varlen
        attention; derived from position_ids (one host sync) when varlen runs without them.
        ``return_token_logps`` (with labels): also each label's log-probability (preference training,
        models.loss.causal_lm_token_logps); the loss sum is then their negated sum.
        ``label_positions``: the supervised labels' flat positions (data.packing.supervised_positions); the
        loss then computes logits only there (``loss_at_label_positions``).
        ``image_index``: each image span's row of ``pixel_values`` where spans share images (``embed``)."""
        embeds = self.embed(input_ids, pixel_values, image_index)
        varlen = {}
        if attention_mask is None and position_ids is not None and uses_varlen(self):
            if cu_seq_lens is None:
                cu_seq_lens, max_length = sample_boundaries_from_position_ids(position_ids)
            cu_seq_lens = cu_seq_lens.to(input_ids.device, non_blocking=True)
            varlen = varlen_kwargs(cu_seq_lens, max_length)
        # use_cache=False: no KV cache in a full forward, and transformers only detects packed rows
        # (position_ids restarting at 0 with attention_mask=None -> block-diagonal causal mask) when
        # there is no cache (masking_utils.find_packed_sequence_indices).
        hidden = self.llm.get_decoder()(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **varlen,
        ).last_hidden_state
        positions = label_positions if self.runtime.loss_at_label_positions else None
        return lm_output(
            hidden,
            self.llm.get_output_embeddings(),
            labels,
            self.runtime.loss_impl,
            positions,
            return_token_logps,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Left-padded prompts -> only the new tokens [B, T] (HF generate from inputs_embeds)."""
        embeds = self.embed(input_ids, pixel_values)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)

    # ------------------------------------------------------------------------------ utilities
    def set_runtime(self, options: RuntimeOptions) -> None:
        """Run as ``options`` say from now on. Kernels and compiled parts already applied stay applied (they
        rewrite modules in place); the new ones are applied here, liger's before compilation."""
        current = self.runtime
        if options.fp8 and not current.fp8:
            # torchao is an optional heavy dependency (the gpu extra): models.fp8 imports it.
            from models.fp8 import convert_frozen_linears

            convert_frozen_linears(self)
        if options.liger_kernels and not current.liger_kernels:
            model_type = self.llm.config.model_type
            if model_type != "qwen2":
                raise UserError(f"perf.liger_kernels supports qwen2 decoders, not {model_type}")
            apply_liger_to(self.llm)
        compile_vision = options.compile_vision and not current.compile_vision
        compile_llm = options.compile_llm and not current.compile_llm
        if compile_vision or compile_llm:
            self.compile_blocks(vision=compile_vision, llm=compile_llm)
        self.runtime = dataclasses.replace(
            options,
            liger_kernels=options.liger_kernels or current.liger_kernels,
            compile_vision=options.compile_vision or current.compile_vision,
            compile_llm=options.compile_llm or current.compile_llm,
            fp8=options.fp8 or current.fp8,
        )

    def module_groups(self) -> dict[str, list[nn.Module]]:
        """Groups for freezing / optimiser settings. "embeddings" (input embeddings + LM head) is a
        subset of "llm", listed apart because it must train when special tokens were added."""
        return {
            "vision": [self.vision],
            "resampler": [self.resampler],
            "llm": [self.llm],
            "embeddings": [self.llm.get_input_embeddings(), self.llm.get_output_embeddings()],
        }

    def set_gradient_checkpointing(
        self, enabled: bool = True, llm_layers: int | None = None, vision: bool = True
    ) -> None:
        """Recompute vision blocks, the resampler and LLM layers in backward (non-reentrant checkpointing).

        ``llm_layers``: how many decoder layers to checkpoint (None = all), spread evenly over the depth;
        the others keep their activations. Fewer checkpointed layers trade memory for one forward less
        of those layers in backward: pick the largest number of un-checkpointed layers the memory budget
        allows (docs/benchmarks.md measures the cost per layer). ``vision=False``: the vision tower and the
        resampler keep their activations (train.memory_budget's choice when memory is to spare).
        """
        self.vision.gradient_checkpointing = enabled and vision
        # The resampler keeps ~80 MB of activations per 448-px image for backward (its k/v projections of
        # 1024 patches at the LLM's width, their bf16 casts, LayerNorm's fp32 input): 1.4 GiB of a LoRA
        # step's 18 images, held through the whole decoder backward, and recomputed in ~0.2 ms per image.
        self.resampler_checkpointing = enabled and vision
        set_decoder_checkpointing(self.llm, enabled, llm_layers)

    def compile_blocks(self, vision: bool = True, llm: bool = False, backend: str = "inductor") -> None:
        """torch.compile each vision block and/or decoder layer in place (fuses LayerNorm/GELU/residual
        element-wise work; one graph per block type, so compile time does not grow with depth). Packed rows
        change length every step: after the first new length the graphs are traced with a dynamic length
        (torch's automatic dynamic shapes) instead of recompiled per length."""
        layers = list(self.llm.get_decoder().layers) if llm else []
        # Layers run by models.decoder_layers compile their parts there, outside the checkpoint.
        compile_layers([layer for layer in layers if installed(layer)], backend)
        for block in (list(self.vision.blocks) if vision else []) + [
            layer for layer in layers if not installed(layer)
        ]:
            block.compile(backend=backend)

    # ------------------------------------------------------------------------------------ I/O
    def save_pretrained(
        self,
        path: str | Path,
        state_dict: dict[str, torch.Tensor] | None = None,
        max_shard_size: int | str = MAX_SHARD_SIZE,
        manifest: bool = True,
    ) -> None:
        """Write config.json, sharded safetensors, (if attached) the tokenizer files and, last, the manifest
        of their sizes and sha256 (models.manifest; checked by models.load_pretrained) to ``path``.

        ``state_dict`` overrides the module's own (e.g. one gathered from ZeRO-3 shards). Tensors
        sharing storage (tied embeddings) are saved once; loading re-ties them. ``manifest=False`` leaves the
        manifest to a caller that adds files of its own (train.checkpoint.export_final).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state_dict = dict(self.state_dict() if state_dict is None else state_dict)
        for key in self.tied_duplicate_keys(state_dict):
            del state_dict[key]
        self.config.save(path / "config.json")
        split = split_torch_state_dict_into_shards(state_dict, max_shard_size=max_shard_size)
        for filename, keys in split.filename_to_tensors.items():
            shard = {k: _own_storage(state_dict[k].detach().contiguous().cpu()) for k in keys}
            save_file(shard, path / filename, metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            (path / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
        if manifest:
            write_manifest(path)

    def tied_duplicate_keys(self, state_dict: dict[str, torch.Tensor]) -> list[str]:
        """Keys of the LM head when it is tied to the input embeddings (same storage)."""
        if not getattr(self.llm.config, "tie_word_embeddings", False):
            return []
        return [k for k in state_dict if k.startswith("llm.") and k.endswith("lm_head.weight")]
