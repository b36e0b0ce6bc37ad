"""``perf.fuse_frozen_projections``: a decoder layer's frozen q/k/v projections as one matrix product, and its
frozen gate/up projections as another.

The three (two) projections read the same input. When their base weights are frozen, the weights are
concatenated once into one ``[q + k + v, hidden]`` matrix and the q, k and v weights become row slices
(views) of it: the model holds no second copy, and ``state_dict`` keeps its keys and shapes (the fused
matrix is a plain attribute, never a parameter or buffer, so it is neither saved nor broadcast). Each
forward then runs one product and splits it; a LoRA adapter on a projection adds its own
``B(A(dropout(x))) * scaling`` to its slice, inside a matrix product (``addmm_``, as train.lora's fused
LoRA forward does). Same maths as the three (two) calls: tests/test_perf_fuse_projections.py pins the loss
and every gradient to the unfused model's.

How the split outputs reach transformers' own attention and MLP forwards (not rewritten here): the
attention (MLP) module's forward computes the fused product, leaves each slice in a dict it shares with
its projections, and runs its own class's forward; each projection's forward takes its slice from the dict
(and runs as before when none is left there: evaluation after ``merge_and_unload``, any other caller).
models.decoder_layers' checkpointed core reads the gate/up slices directly (``fused_outputs``).

Where it applies: the Llama-family decoder layers models.decoder_layers knows (their attention calls
q/k/v, and their MLP gate/up, on the module's input), with plain ``nn.Linear`` base weights. Not to
bitsandbytes 4-bit layers (Q-LoRA): their weights are packed 4-bit blocks with per-block statistics that
bitsandbytes dequantises inside each layer's own kernel; a concatenated matrix would need a 4-bit kernel of
its own. Not to trainable projections (full fine-tuning): their separate parameters would have to be
views of one trained tensor, which optimisers and ZeRO's partitioning do not expect.

The views last as long as the parameters are changed in place (training freezes them; a checkpoint load
and peft's default merge copy into them). Anything that gives a parameter new storage (``module.to`` to
another device or dtype, ``merge(safe_merge=True)``) would leave the fused matrix stale: fuse after the
model is placed, as the trainer does (train.perf.apply_perf_switches).

Written here because neither transformers nor peft fuse the projections of a Qwen2/Llama layer (peft's
LoRA layers wrap one linear each).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn

from models.errors import UserError

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj")


@dataclass
class FusedGroup:
    """Projections of one module fused into one product: their names, their row range in ``weight``."""

    names: tuple[str, ...]
    bounds: list[tuple[int, int]]
    weight: torch.Tensor  # [sum of out_features, in_features]; the projections' weights are views of it
    bias: torch.Tensor | None
    input_name: str  # the keyword the module's forward takes its input by ("hidden_states", "x")


def plain_adapter(layer: nn.Module) -> str | None:
    """The name of the one adapter a peft LoRA linear adds as ``B(A(dropout(x))) * scaling``, or None where
    peft's forward does more or other (adapters disabled or merged, several adapters, a DoRA-like variant,
    a LoRA bias)."""
    active = layer.active_adapters
    if (
        layer.disable_adapters
        or layer.merged
        or len(active) != 1
        or active[0] not in layer.lora_A
        or active[0] in getattr(layer, "lora_variant", {})
        or getattr(layer, "lora_bias", {}).get(active[0])
    ):
        return None
    return active[0]


def add_adapter_product(out: torch.Tensor, layer: nn.Module, name: str, rows: torch.Tensor) -> None:
    """``out += B(A(dropout(rows))) * scaling`` in place, the scaling on the rank-r product and the add inside
    the matrix product (train.lora's fused LoRA forward). ``out``: [tokens, out_features], may be a slice."""
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    dropped = layer.lora_dropout[name](rows)
    if not torch.is_autocast_enabled(rows.device.type):
        dropped = dropped.to(a.dtype)
    h = torch.nn.functional.linear(dropped, a) * layer.scaling[name]
    out.addmm_(h.to(out.dtype), b.t().to(out.dtype))  # in-place ops skip autocast: cast B as autocast would


def fused_outputs(owner: nn.Module, x: torch.Tensor) -> list[torch.Tensor] | None:
    """The outputs of ``owner``'s fused projections for input ``x``, in the group's order, from one product;
    None when ``owner`` has no fused group or one of its projections needs peft's own forward."""
    group: FusedGroup | None = getattr(owner, "_vlrecipe_fused_group", None)
    if group is None:
        return None
    layers = [getattr(owner, name) for name in group.names]
    adapters = []
    for layer in layers:
        if not hasattr(layer, "lora_A") or (layer.disable_adapters and not layer.merged):
            adapters.append(None)  # a plain linear, or adapters switched off: the base product alone
        elif (adapter := plain_adapter(layer)) is not None:
            adapters.append(adapter)
        else:
            return None
    rows = x.reshape(-1, x.shape[-1])
    out = torch.nn.functional.linear(rows, group.weight, group.bias)  # fresh: nothing saves it
    for layer, adapter, (start, end) in zip(layers, adapters, group.bounds):
        if adapter is not None:
            add_adapter_product(out[:, start:end], layer, adapter, rows)
    return [out[:, start:end].view(*x.shape[:-1], end - start) for start, end in group.bounds]


def _forward_with_fused_projections(self: nn.Module, *args, **kwargs):
    """The module's own forward, its fused projections' outputs computed beforehand in one product."""
    group: FusedGroup = self._vlrecipe_fused_group
    outputs = fused_outputs(self, args[0] if args else kwargs[group.input_name])
    if outputs is not None:
        self._vlrecipe_given.update(zip(group.names, outputs))
    result = type(self).forward(self, *args, **kwargs)
    self._vlrecipe_given.clear()  # each projection took its slice; nothing outlives the call
    return result


def _given_or_own_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A fused projection: its slice of the fused product when its module left one, else its own forward."""
    given = self._vlrecipe_given.pop(self._vlrecipe_slot, None)
    return self._vlrecipe_own_forward(x, *args, **kwargs) if given is None else given


def _fuse(owner: nn.Module, names: tuple[str, ...], input_name: str, where: str) -> None:
    projections = [getattr(owner, name) for name in names]
    bases = [getattr(p, "base_layer", p) for p in projections]
    for name, base in zip(names, bases):
        if type(base) is not nn.Linear:
            raise UserError(
                f"perf.fuse_frozen_projections: {where}.{name} is a {type(base).__name__}, not a plain "
                "nn.Linear (Q-LoRA's 4-bit layers and perf.fp8's FP8 layers keep separate products)"
            )
        if any(p.requires_grad for p in base.parameters()):
            raise UserError(
                f"perf.fuse_frozen_projections: the base weight of {where}.{name} trains; only frozen "
                "projections fuse (set it false, or freeze.llm: frozen with LoRA)"
            )
    if len({(b.weight.dtype, b.weight.device, b.bias is None) for b in bases}) != 1:
        raise UserError(
            f"perf.fuse_frozen_projections: {where}.{{{','.join(names)}}} differ in dtype, device or bias"
        )
    sizes = [b.out_features for b in bases]
    bounds = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes))]
    with torch.no_grad():
        weight = torch.cat([b.weight for b in bases])
        bias = None if bases[0].bias is None else torch.cat([b.bias for b in bases])
        for base, (start, end) in zip(bases, bounds):  # the parameters become views: no second copy
            base.weight.data = weight[start:end]
            if bias is not None:
                base.bias.data = bias[start:end]
    given: dict[str, torch.Tensor] = {}
    owner._vlrecipe_fused_group = FusedGroup(names, bounds, weight, bias, input_name)
    owner._vlrecipe_given = given
    owner.forward = types.MethodType(_forward_with_fused_projections, owner)
    for name, projection in zip(names, projections):
        projection._vlrecipe_given, projection._vlrecipe_slot = given, name
        projection._vlrecipe_own_forward = projection.forward  # peft's, or train.lora's fused LoRA forward
        projection.forward = types.MethodType(_given_or_own_forward, projection)


def fuse_frozen_projections(layers: nn.ModuleList, layer_types: frozenset[str]) -> int:
    """Fuse q/k/v and gate/up of every decoder layer in ``layers`` (whose type must be one of
    ``layer_types``); returns how many groups were fused. Raises UserError where it cannot apply."""
    count = 0
    for i, layer in enumerate(layers):
        if type(layer).__name__ not in layer_types:
            raise UserError(
                f"perf.fuse_frozen_projections: decoder layer type {type(layer).__name__} is not one of "
                f"{', '.join(sorted(layer_types))}"
            )
        for owner, attribute, names, input_name in (
            (layer.self_attn, "self_attn", ATTENTION_PROJECTIONS, "hidden_states"),
            (layer.mlp, "mlp", MLP_PROJECTIONS, "x"),
        ):
            if not hasattr(owner, "_vlrecipe_fused_group"):
                _fuse(owner, names, input_name, f"layers.{i}.{attribute}")
                count += 1
    return count
