"""How the trainer runs Llama-family decoder layers: checkpointed without recomputing the down projection, and
compiled outside the checkpoint.

A checkpointed layer keeps only its input and runs its forward again in backward. Everything that recompute
produces is needed by the layer's backward except the last product, the MLP's down projection: when its weight
is frozen (LoRA on the other projections, Q-LoRA, a frozen LLM) its backward needs neither its input nor its
output, only the weight. So a checkpointed layer runs as

    hidden, act = checkpoint(core)(x)      # attention + residual, post-attention norm, SiLU(gate(x)) * up(x)
    out = hidden + down_proj(act)          # outside the checkpoint: saves nothing, never recomputed

the same maths as the layer's forward, minus one of its seven products in the recompute: a 7B layer costs
3 x 404 MFLOP per token in a LoRA step (forward, recompute, input gradient), the recompute's down projection
90 of them. A trainable down projection would have to keep ``act`` (2.7x the layer's input), and an fp32 one
under bf16 autocast the bf16 copy of its weight, so such a layer is checkpointed whole. The compiled graph
(``compile_layers``) is the core, called by the checkpoint, never a checkpoint inside a graph: transformers
5.17 checkpoints around the layer's call and 5.25 inside its forward, and inductor 2.11 crashed on the
latter (docs/benchmarks.md), so this module decides the nesting itself.

Written here because transformers checkpoints whole layers only. Layers of other architectures keep
transformers' own checkpointing; outside training (evaluation, generation) a layer runs its own forward.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.fused_projections import fused_outputs

# Decoder layers whose forward is exactly: norm -> attention -> residual -> norm -> down(act(gate) * up) ->
# residual (tests/test_model_decoder_layers.py checks each against its own forward).
# The HF VLM families' decoders (models.families) are Qwen2 / Qwen3 decoders with M-RoPE position tables:
# the same layer forward.
SPLIT_LAYER_TYPES = frozenset(
    {
        "LlamaDecoderLayer",
        "MistralDecoderLayer",
        "Qwen2DecoderLayer",
        "Qwen3DecoderLayer",
        "Qwen2VLDecoderLayer",
        "Qwen2_5_VLDecoderLayer",
        "Qwen3VLTextDecoderLayer",
    }
)


def _core(layer: nn.Module, hidden_states: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer up to its down projection: (hidden after the attention's residual add, SiLU(gate) * up)."""
    residual = hidden_states
    hidden = layer.input_layernorm(hidden_states)
    hidden, _ = layer.self_attn(hidden_states=hidden, **kwargs)
    hidden = residual + hidden
    mlp = layer.mlp
    x = layer.post_attention_layernorm(hidden)
    # gate and up from one product where perf.fuse_frozen_projections fused them (models.fused_projections)
    gate, up = fused_outputs(mlp, x) or (mlp.gate_proj(x), mlp.up_proj(x))
    return hidden, mlp.act_fn(gate) * up


def _whole(layer: nn.Module, hidden_states: torch.Tensor, kwargs: dict) -> torch.Tensor:
    hidden, act = _core(layer, hidden_states, kwargs)
    return hidden + layer.mlp.down_proj(act)


def _training_forward(self: nn.Module, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    if not self.training:  # evaluation, generation (KV cache): the layer's own forward
        return type(self).forward(self, hidden_states, **kwargs)
    core, whole = self._vlrecipe_core, self._vlrecipe_whole
    if not (self._vlrecipe_checkpointed and torch.is_grad_enabled()):
        return whole(self, hidden_states, kwargs)
    if not down_projection_keeps_nothing(self, hidden_states.device.type):
        return checkpoint(whole, self, hidden_states, kwargs, use_reentrant=False)
    hidden, act = checkpoint(core, self, hidden_states, kwargs, use_reentrant=False)
    return hidden + self.mlp.down_proj(act)


def down_projection_keeps_nothing(layer: nn.Module, device_type: str) -> bool:
    """Whether the down projection, run outside the checkpoint, saves nothing that would not exist anyway: its
    weights are frozen (a trainable one keeps its input, ``act``) and autocast does not cast them (an fp32
    weight under bf16 autocast keeps its bf16 copy for backward, as large as the weight, in every layer: 2.9
    GB over a 7B decoder; the plain anchor's fp32 frozen weights measured 46.2 GiB split, 43.5 whole)."""
    params = list(layer.mlp.down_proj.parameters())
    if any(p.requires_grad for p in params):
        return False
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return not any(p.is_floating_point() and p.dtype != dtype for p in params)
    return True


def install_checkpointing(layer: nn.Module, checkpointed: bool) -> bool:
    """Run ``layer`` as above (checkpointed or not) when it is a Llama-family layer; returns whether it is.
    transformers' own checkpointing of the layer is switched off: this forward decides."""
    if type(layer).__name__ not in SPLIT_LAYER_TYPES:
        return False
    layer.gradient_checkpointing = False
    layer._vlrecipe_checkpointed = checkpointed
    if not hasattr(layer, "_vlrecipe_core"):
        layer._vlrecipe_core, layer._vlrecipe_whole = _core, _whole
        layer.forward = types.MethodType(_training_forward, layer)
    return True


def installed(layer: nn.Module) -> bool:
    return hasattr(layer, "_vlrecipe_core")


def is_checkpointed(layer: nn.Module) -> bool:
    """Whether a training forward of ``layer`` recomputes it in backward (by this module or transformers)."""
    return (
        layer._vlrecipe_checkpointed
        if installed(layer)
        else bool(getattr(layer, "gradient_checkpointing", False))
    )


_COMPILED: dict[str, tuple] = {}


def compile_layers(layers: list[nn.Module], backend: str = "inductor") -> None:
    """Compile the core and the whole layer of installed layers (one graph for all layers: their weights are
    inputs of the graph, not constants)."""
    if backend not in _COMPILED:
        _COMPILED[backend] = (torch.compile(_core, backend=backend), torch.compile(_whole, backend=backend))
    core, whole = _COMPILED[backend]
    for layer in layers:
        layer._vlrecipe_core, layer._vlrecipe_whole = core, whole


def checkpointed_layer_indices(num_layers: int, num_checkpointed: int) -> set[int]:
    """``num_checkpointed`` of ``num_layers`` indices, evenly spread (all when equal, none when 0)."""
    if not 0 <= num_checkpointed <= num_layers:
        raise ValueError(f"cannot checkpoint {num_checkpointed} of {num_layers} layers")
    return (
        {int(i * num_layers / num_checkpointed) for i in range(num_checkpointed)}
        if num_checkpointed
        else set()
    )


def set_decoder_checkpointing(model: nn.Module, enabled: bool, llm_layers: int | None = None) -> None:
    """Switch transformers' activation checkpointing (non-reentrant) of ``model``, a Hugging Face model, on
    or off, and choose which decoder layers (``model.get_decoder().layers``) recompute in backward:
    ``llm_layers`` of them (None = all), spread evenly over the depth. Llama-family layers skip a frozen down
    projection's recompute (``install_checkpointing``); others are checkpointed whole by transformers."""
    layers = model.get_decoder().layers
    # transformers 5.2x renamed gradient_checkpointing_* to activation_checkpointing_* (and warns on the old
    # names); earlier 5.x releases (5.17, the GPU machines') have only the old ones.
    renamed = hasattr(model, "activation_checkpointing_enable")
    if not enabled:
        (model.activation_checkpointing_disable if renamed else model.gradient_checkpointing_disable)()
        for layer in layers:
            if installed(layer):
                install_checkpointing(layer, False)
        return
    if renamed:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    chosen = checkpointed_layer_indices(len(layers), len(layers) if llm_layers is None else llm_layers)
    for i, layer in enumerate(layers):
        if not install_checkpointing(layer, i in chosen):
            layer.gradient_checkpointing = i in chosen
