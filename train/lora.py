"""LoRA and Q-LoRA through peft / bitsandbytes.

LoRA adapts the LLM's linear layers (``lora.targets``, matched only inside ``llm.``) and, when asked, the
vision tower's (``lora.vision_targets``, e.g. ``attn.qkv``, matched only inside ``vision.blocks``; the ViT
stays frozen, its adapters train, are saved in the adapter and merged on export). Everything the
recipe's ``freeze`` section says trains besides the LLM (resampler, vision tower, and embeddings +
LM head when special tokens were added) becomes a peft ``modules_to_save`` entry, so it trains *and*
is stored in the adapter. (The reference's final save kept only ``lora_`` tensors, losing trained
embeddings of a base model, and froze the resampler under LoRA, Qwen-VL#116.)
"""

from __future__ import annotations

import re
import sys
import types

import torch
from torch import nn
from tqdm import tqdm

from models.errors import UserError
from models.fused_projections import add_adapter_product, plain_adapter
from models.loading import import_peft
from train.freeze import embeddings_train
from train.recipe import FreezeSection, LoraSection, QuantizationSection


def modules_to_save(model: nn.Module, freeze: FreezeSection) -> list[str]:
    """Attribute names (last path component) of the modules of ``module_groups()`` that the freeze section
    trains besides the LLM: ``vision``/``resampler`` on the Qwen-VL model, a family's ``merger``..."""
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    groups = model.module_groups()
    # peft wraps modules, not lists of them (Qwen3-VL's deepstack_merger_list): a list's elements are named
    # by their dotted suffix ("deepstack_merger_list.0"), which peft's suffix match takes.
    trained = [
        f"{names[id(m)]}.{i}" if isinstance(m, nn.ModuleList) else names[id(m)]
        for group in ("vision", "resampler")
        if getattr(freeze, group) == "train"
        for m in groups[group]
        for i in range(len(m) if isinstance(m, nn.ModuleList) else 1)
    ]
    if embeddings_train(freeze, bool(getattr(model.config, "train_embeddings", False))):
        trained += _embedding_module_names(model)
    return trained


def _embedding_module_names(model: nn.Module) -> list[str]:
    """Attribute names (last path component) of the LLM's input embeddings and LM head."""
    wanted = {id(model.llm.get_input_embeddings()): None, id(model.llm.get_output_embeddings()): None}
    return [name.rsplit(".", 1)[-1] for name, module in model.llm.named_modules() if id(module) in wanted]


def target_pattern(lora: LoraSection, model: nn.Module | None = None) -> str:
    """peft's target_modules regex: the LLM's targets inside ``llm.``, the vision targets inside the ViT's
    blocks, so same-named layers elsewhere never get adapters. A Hugging Face family's model names its own
    (``HFFamilyModel.lora_target_pattern``: its LLM and ViT sit elsewhere)."""
    if hasattr(model, "lora_target_pattern"):
        return model.lora_target_pattern(lora.targets, lora.vision_targets)
    pattern = rf"llm\..*\.({'|'.join(map(re.escape, lora.targets))})"
    if lora.vision_targets:
        pattern += rf"|vision\.blocks\.\d+\.({'|'.join(map(re.escape, lora.vision_targets))})"
    return rf"^({pattern})$"


def apply_lora(
    model: nn.Module, lora: LoraSection, freeze: FreezeSection, gradient_checkpointing: bool = False
):
    """Wrap the VLM in a peft model: LoRA adapters on the LLM (and the ViT), the recipe's trained modules
    saved in full."""
    peft = import_peft()

    if freeze.llm == "train":
        raise UserError(
            "lora.enabled with freeze.llm: train: LoRA adapts a frozen LLM; set freeze.llm: frozen"
        )
    if lora.vision_targets and freeze.vision == "train":
        raise UserError("lora.vision_targets adapts a frozen vision tower; set freeze.vision: frozen")
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_pattern(lora, model),
        modules_to_save=modules_to_save(model, freeze) or None,
        bias="none",
    )
    if gradient_checkpointing:
        # Checkpointed blocks need an input that requires grad for their recompute to reach the
        # adapters when the embeddings are frozen.
        model.llm.enable_input_require_grads()
    return peft.get_peft_model(model, config)


def quantize_llm_4bit(model: nn.Module, cfg: QuantizationSection, device: torch.device) -> None:
    """Replace the LLM decoder's nn.Linear layers by bitsandbytes 4-bit ones, in place, one decoder layer at
    a time: the layer is moved to the GPU (or, when the LLM was built on the meta device, created there and
    randomly initialised), its linears quantised, and its bf16 weights freed, so the GPU never holds the
    whole decoder in bf16 (15 GB at 7B, more than Q-LoRA's whole budget). CUDA only. The vision tower,
    resampler, embeddings and LM head stay in higher precision (as in the reference's Int4 checkpoint).

    Written by hand because transformers quantises only while loading a checkpoint with
    ``from_pretrained``, and the LLM here is part of a VLM loaded from our own directory. peft's
    ``prepare_model_for_kbit_training`` is not called: it upcasts every other weight (the 1.8B ViT
    included) to fp32, which the trainer would only cast back (perf.frozen_bf16); the one thing of it
    checkpointing needs, inputs that require grad, apply_lora does.
    """
    import bitsandbytes as bnb  # optional heavy dependency: only Q-LoRA (CUDA) imports it

    if device.type != "cuda":
        raise RuntimeError("Q-LoRA (quantization.enabled) needs a CUDA GPU: bitsandbytes 4-bit kernels")
    compute_dtype = getattr(torch, cfg.compute_dtype)
    llm = model.llm
    decoder = llm.get_decoder()

    def materialise(module: nn.Module) -> None:
        if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
            module.to_empty(device=device)
            with torch.no_grad():
                for sub in module.modules():
                    llm._init_weights(sub)  # the LLM's own random init (incl. RoPE tables), on the GPU
        else:
            module.to(device)

    def quantise(parent: nn.Module, name: str, child: nn.Linear) -> None:
        q = bnb.nn.Linear4bit(
            child.in_features,
            child.out_features,
            bias=child.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=cfg.double_quant,
            quant_type=cfg.quant_type,
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            child.weight.data.to(compute_dtype),
            requires_grad=False,
            compress_statistics=cfg.double_quant,
            quant_type=cfg.quant_type,
        ).to(device)
        if child.bias is not None:
            q.bias = nn.Parameter(child.bias.data, requires_grad=False)
        setattr(parent, name, q)

    for layer in tqdm(decoder.layers, desc="quantising the decoder to 4 bits", unit="layer"):
        materialise(layer)
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    quantise(parent, name, child)
    for module in llm.modules():  # embeddings, final norm, RoPE tables, LM head
        if any(t.is_meta for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]):
            materialise(module)
    model.to(device)


def _fused_lora_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's LoRA linear, ``base(x) + B(A(dropout(x))) * scaling``, with less element-wise work per call:
    the scaling multiplies the rank-r product (r columns, not the layer's output width), and the base output
    takes the adapter's product in place, in the matrix product itself (``addmm_``: C += h @ B^T), where peft
    writes ``B(...)``, scales it and adds it in two more passes over the output (three with Q-LoRA's
    defensive clone of the 4-bit output). The dropout runs in the input's dtype, which under autocast is the
    dtype the product reads anyway (peft first copies the input to the adapter's fp32). Anything else peft
    handles (adapters disabled or merged, several adapters, DoRA-like variants, extra arguments) goes to
    peft's own forward. Same maths; tests/test_train_lora.py pins outputs and gradients to peft's. Written
    here because peft has no such path (its forward is one per layer type, for every adapter setting)."""
    name = None if args or kwargs else plain_adapter(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    rows = x.reshape(-1, x.shape[-1])
    out = self.base_layer(rows)  # a fresh [tokens, out] tensor: nothing saves it, so it may take the add
    add_adapter_product(out, self, name, rows)
    return out.view(*x.shape[:-1], out.shape[-1])


def fuse_lora_forwards(model: nn.Module) -> int:
    """Run every peft LoRA linear layer of ``model`` through ``_fused_lora_forward``; returns how many."""
    if "peft" not in sys.modules:  # no peft layer can exist; importing peft would only cost start-up time
        return 0
    LoraLayer = import_peft("peft.tuners.lora").LoraLayer

    count = 0
    for module in model.modules():
        if (
            isinstance(module, LoraLayer)
            and isinstance(getattr(module, "base_layer", None), nn.Linear)
            and not hasattr(module, "_vlrecipe_fused")
        ):
            module.forward = types.MethodType(_fused_lora_forward, module)
            module._vlrecipe_fused = True
            count += 1
    return count
