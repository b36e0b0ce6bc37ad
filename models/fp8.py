"""``perf.fp8``: the frozen linear layers' matrix products in FP8 (torchao's float8 training), opt-in.

Which products: every ``nn.Linear`` of the decoder layers and the vision tower whose weights are frozen (under
LoRA: the base layers of the adapted q/k/v/o and gate/up projections, and the down projections; the frozen
ViT's blocks). Their forward and their input gradient run as FP8 matrix products with dynamic, per-tensor
scales (torchao's default recipe: e4m3 for inputs, weights and output gradients). Everything that trains (the
LoRA adapters, the resampler, a trained LLM or ViT), the norms, attention, the LM head and the loss stay in
bf16/fp32. Not loss-equal: docs/benchmarks.md measures how far it moves the loss; docs/training.md says when
to turn it on.

Where it runs: CUDA cards with FP8 tensor cores (compute capability 8.9 or newer: Ada, H100, H200, B200) with
torchao installed (``pip install .[gpu]``); train.perf.fp8_unavailable says why not elsewhere (one log line),
and for Q-LoRA's 4-bit decoder (bitsandbytes layers, not nn.Linear). This module imports torchao: the trainer
imports it only with perf.fp8 on.

torchao's ``Float8Linear`` computes the weight's gradient in every backward and keeps the layer's input for
it, whether or not the weight trains; a frozen weight needs neither (one FP8 product of the two in backward,
and the input of every frozen linear of a layer that is not checkpointed). ``FrozenFloat8Linear`` keeps
torchao's module, casts and scaled products and replaces only the autograd function with one that computes the
input gradient alone: written here because torchao has no frozen-weight path.
"""

from __future__ import annotations

import torch
from torch import nn
from torchao.float8 import Float8LinearConfig, convert_to_float8_training
from torchao.float8.config import CastConfig
from torchao.float8.float8_linear import Float8Linear
from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
from torchao.float8.float8_training_tensor import GemmInputRole, LinearMMConfig

ALIGNMENT = 16  # FP8 matrix products need both dimensions divisible by 16


def frozen_linear(module: nn.Module, name: str) -> bool:
    """The ``module_filter_fn``: a plain ``nn.Linear`` (not an adapter, not a 4-bit layer) whose parameters
    are all frozen and whose dimensions FP8 products accept."""
    if type(module) is not nn.Linear or "lora_" in name:
        return False
    if any(p.requires_grad for p in module.parameters()):
        return False
    return module.in_features % ALIGNMENT == 0 and module.out_features % ALIGNMENT == 0


def fp8_parts(vlm) -> dict[str, nn.Module]:
    """The parts whose frozen linears run in FP8: the decoder layers (not the LM head: the fused loss reads
    its weight directly) and the vision tower's blocks (not the resampler,
    which trains in every shipped stage). An HF family's model names its own (HFFamilyModel.fp8_parts)."""
    if hasattr(vlm, "fp8_parts"):
        return vlm.fp8_parts()
    return {"decoder": vlm.llm.get_decoder().layers, "vision": vlm.vision.blocks}


def _to_fp8(
    tensor: torch.Tensor,
    cast: CastConfig,
    mm_config: LinearMMConfig,
    role: GemmInputRole,
    dim: int,
    config: Float8LinearConfig,
):
    """torchao's dynamic cast of one operand, as its Float8Linear does it
    (``dim``: the axis of axiswise scales)."""
    axiswise = cast.scaling_granularity.value == "axiswise"
    return hp_tensor_to_float8_dynamic(
        tensor,
        cast.target_dtype,
        mm_config,
        gemm_input_role=role,
        scaling_granularity=cast.scaling_granularity,
        axiswise_dim=dim if axiswise else None,
        round_scales_to_power_of_2=config.round_scales_to_power_of_2,
    )


class FrozenWeightFloat8Matmul(torch.autograd.Function):
    """``input @ weight_t`` in FP8; backward: the input's gradient only (the weight is frozen)."""

    @staticmethod
    def forward(ctx, input_hp, weight_hp_t, mm_config, config):
        ctx.save_for_backward(weight_hp_t)  # a view of the frozen weight: nothing new is kept
        ctx.mm_config, ctx.config = mm_config, config
        x = _to_fp8(input_hp, config.cast_config_input, mm_config, GemmInputRole.INPUT, -1, config)
        w = _to_fp8(weight_hp_t, config.cast_config_weight, mm_config, GemmInputRole.WEIGHT, 0, config)
        shape = x.shape
        return torch.mm(x.reshape(-1, shape[-1]), w).reshape(*shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_output):
        (weight_hp_t,) = ctx.saved_tensors
        c, mm_config = ctx.config, ctx.mm_config
        shape = grad_output.shape
        g = _to_fp8(
            grad_output.reshape(-1, shape[-1]),
            c.cast_config_grad_output,
            mm_config,
            GemmInputRole.GRAD_OUTPUT,
            -1,
            c,
        )
        w = _to_fp8(weight_hp_t, c.cast_config_weight_for_grad_input, mm_config, GemmInputRole.WEIGHT, -1, c)
        return torch.mm(g, w.t()).reshape(*shape[:-1], -1), None, None, None


class FrozenFloat8Linear(Float8Linear):
    """torchao's Float8Linear for a frozen weight (module docstring)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(input.device.type):  # as Float8Linear: the autocast dtype in and out
            input = input.to(torch.get_autocast_dtype(input.device.type))
        out = FrozenWeightFloat8Matmul.apply(input, self.weight.t(), self.linear_mm_config, self.config)
        return out if self.bias is None else out + self.bias.to(out.dtype)


def convert_frozen_linears(vlm, emulate: bool = False) -> dict[str, int]:
    """Swap the frozen linears of ``fp8_parts`` for ``FrozenFloat8Linear`` (in place); how many per part.
    ``emulate``: torchao's emulation of the FP8 products in high precision (tests on a CPU)."""
    config = Float8LinearConfig(emulate=emulate)
    counts = {}
    for part, modules in fp8_parts(vlm).items():
        # torchao's public entry point swaps the modules (and patches inductor for its FP8 kernels); the
        # swapped modules then take the frozen-weight forward and backward above.
        convert_to_float8_training(modules, module_filter_fn=frozen_linear, config=config)
        swapped = [m for m in modules.modules() if type(m) is Float8Linear]
        for module in swapped:
            module.__class__ = FrozenFloat8Linear
        counts[part] = len(swapped)
    return counts
