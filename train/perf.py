"""The recipe's ``perf`` section applied to a built VLM (the trainer calls it; train.bench times the trainer).

Every switch computes the same loss as the plain path (tests/test_perf_*.py); measured gains are in
docs/benchmarks.md. "auto" values are resolved here, once, against what this process can run.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import torch

from models.attention import set_attention
from models.decoder_layers import SPLIT_LAYER_TYPES
from models.errors import UserError
from models.fused_projections import fuse_frozen_projections
from models.vlm import RuntimeOptions
from train.lora import fuse_lora_forwards
from train.recipe import PerfSection

FP8_MIN_CAPABILITY = (8, 9)  # FP8 tensor cores (torch._scaled_mm): Ada, Hopper and newer


# ZeRO-3 gathers each layer's parameters in module hooks; compiled layers under it are not verified.
ZERO3_COMPILE_WHY = "not verified under ZeRO-3"


def compile_llm_blockers(cuda: bool, quantized: bool, zero3: bool, adapter_off_reference: bool) -> list[str]:
    """Why ``perf.compile_llm: auto`` leaves the decoder layers uncompiled (none: they compile). The planner
    asks the same question: compiled layers keep fewer bytes than eager ones (train.plan)."""
    reasons = [
        "" if cuda else "no CUDA device",
        "bitsandbytes 4-bit layers do not compile" if quantized else "",
        ZERO3_COMPILE_WHY if zero3 else "",
        # DPO's reference pass through the same layers with the adapters switched off: on the H100 the
        # compiled decoder layers' checkpointed recompute then saved other tensors than their forward
        # (CheckpointError).
        "DPO's adapter-disabled reference pass breaks the compiled layers' recompute"
        if adapter_off_reference
        else "",
    ]
    return [why for why in reasons if why]


def resolve_perf(
    perf: PerfSection,
    vlm,
    cuda: bool,
    quantized: bool,
    zero3: bool = False,
    adapter_off_reference: bool = False,
) -> tuple[PerfSection, list[str]]:
    """``perf`` with every "auto" replaced by True or False, and one line per switch that auto turned off
    (the trainer prints them)."""
    notes: list[str] = []

    def auto(name: str, reasons: list[str]) -> bool:
        blockers = [why for why in reasons if why]
        if blockers:
            notes.append(f"perf.{name}: auto -> off ({'; '.join(blockers)})")
        return not blockers

    no_cuda = "" if cuda else "no CUDA device"
    resolved = {}
    if perf.compile_llm == "auto":
        resolved["compile_llm"] = auto(
            "compile_llm", compile_llm_blockers(cuda, quantized, zero3, adapter_off_reference)
        )
    compiles_llm = resolved.get("compile_llm", perf.compile_llm) is True
    if perf.liger_kernels == "auto":
        resolved["liger_kernels"] = auto(
            "liger_kernels",
            [
                no_cuda,
                ""
                if importlib.util.find_spec("liger_kernel")
                else "liger-kernel is not installed (pip install .[gpu])",
                ""
                if vlm.llm.config.model_type == "qwen2"
                else f"no liger kernels for {vlm.llm.config.model_type}",
                # Measured on one H100 (docs/benchmarks.md): the compiled layers without liger ran 12% faster
                # than with it. Inductor fuses RMSNorm, RoPE and SwiGLU itself,
                # and liger's RoPE breaks the layer's graph.
                "the decoder layers compile (inductor fuses what liger would)" if compiles_llm else "",
            ],
        )
    if perf.compile_vision == "auto":
        resolved["compile_vision"] = auto("compile_vision", [no_cuda, ZERO3_COMPILE_WHY if zero3 else ""])
    if perf.attention == "varlen" and not cuda:
        # torch's varlen kernel is flash attention, which has no CPU backend. SDPA confines attention to each
        # packed sample too, with the mask transformers builds from positions restarting at 0 per sample.
        notes.append("perf.attention: varlen -> sdpa (no CUDA device; the same per-sample attention)")
        resolved["attention"] = "sdpa"
    if perf.offload_activations and not cuda:  # pinned host memory and copy streams are CUDA's
        notes.append("perf.offload_activations: off (no CUDA device)")
        resolved["offload_activations"] = False
    if perf.fp8:
        why = fp8_unavailable(cuda, torch.cuda.get_device_capability() if cuda else None, quantized, zero3)
        notes.append(
            f"perf.fp8: off ({why})"
            if why
            else "perf.fp8: on (frozen linears of the decoder layers and vision blocks in FP8, torchao)"
        )
        resolved["fp8"] = not why
    if perf.fuse_frozen_projections == "auto":
        # Loss-equal and free of memory, but measured slower on the LoRA recipe (docs/benchmarks.md).
        notes.append(
            "perf.fuse_frozen_projections: auto -> off (9% slower than unfused on the LoRA recipe, one H100; "
            "docs/benchmarks.md)"
        )
        resolved["fuse_frozen_projections"] = False
    elif perf.fuse_frozen_projections:
        why = fusion_unavailable(quantized, zero3, bool(resolved.get("fp8", perf.fp8)))
        if why:
            raise UserError(f"perf.fuse_frozen_projections: {why}; set it false")
    return dataclasses.replace(perf, **resolved), notes


def fusion_unavailable(quantized: bool, zero3: bool, fp8: bool) -> str:
    """Why perf.fuse_frozen_projections (models/fused_projections.py) cannot run, or "" where it can
    (trainable projections are refused when it is applied)."""
    if quantized:
        return (
            "Q-LoRA's projections are bitsandbytes 4-bit layers, each dequantised by its own kernel; "
            "their packed weights do not concatenate into one product"
        )
    if zero3:
        return "ZeRO-3 partitions each projection's weight on its own"
    if fp8:
        return "perf.fp8 runs each frozen projection as its own FP8 product"
    return ""


def fp8_unavailable(
    cuda: bool,
    capability: tuple[int, int] | None,
    quantized: bool = False,
    zero3: bool = False,
    installed: bool | None = None,
) -> str:
    """Why perf.fp8 (models/fp8.py) cannot run here, or "" where it can."""
    if not cuda:
        return "no CUDA device"
    if capability is not None and tuple(capability) < FP8_MIN_CAPABILITY:
        return (
            f"compute capability {capability[0]}.{capability[1]} has no FP8 tensor cores (needs "
            f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}: Ada, Hopper or newer)"
        )
    if quantized:
        return "Q-LoRA's decoder linears are 4-bit bitsandbytes layers"
    if zero3:
        return "not verified under ZeRO-3"
    if not (importlib.util.find_spec("torchao") is not None if installed is None else installed):
        return "torchao is not installed (pip install .[gpu])"
    return ""


def apply_perf_switches(vlm, perf: PerfSection) -> None:
    """Apply a resolved ``perf`` section (no "auto" left) to a built VLM, after freezing, quantisation and
    LoRA. Checkpointing depth is set by ``VLM.set_gradient_checkpointing``; frozen_bf16 by the trainer's
    build (train.assemble.storage_dtypes). Compilation and liger kernels cannot be undone."""
    if "auto" in (perf.liger_kernels, perf.compile_llm, perf.compile_vision, perf.fuse_frozen_projections):
        raise ValueError("apply_perf_switches needs a resolved perf section (train.perf.resolve_perf)")
    set_attention(vlm, perf.attention)
    # FP8 before the LoRA forwards are fused and layers compile (models.fp8 converts the plain linears).
    vlm.set_runtime(dataclasses.replace(vlm.runtime, fp8=perf.fp8))
    torch.backends.cuda.enable_cudnn_sdp(perf.cudnn_attention)  # process-wide, like torch's own default
    if perf.fused_lora:
        # Measured on one H100 (docs/benchmarks.md): Q-LoRA's eager decoder +24% (+19% by the median step);
        # inside compiled layers 1.6-2.7% slower than peft's forward, whose element-wise work inductor fuses.
        compiled = vlm.runtime
        for part, compiles in (
            (vlm.llm, perf.compile_llm or compiled.compile_llm),
            (vlm.vision, perf.compile_vision or compiled.compile_vision),
        ):
            if not compiles:
                fuse_lora_forwards(part)  # before compilation, which would trace the forwards it finds
    if perf.fuse_frozen_projections:
        # After the fused LoRA forwards, which the fused projections then call for anything not fused.
        fuse_frozen_projections(vlm.llm.get_decoder().layers, SPLIT_LAYER_TYPES)
    vlm.set_runtime(runtime_options(perf))


def runtime_options(perf: PerfSection) -> RuntimeOptions:
    """The model's share of a resolved ``perf`` section: how its forward runs (models.vlm.RuntimeOptions)."""
    return RuntimeOptions(
        loss_impl=perf.loss_impl,
        check_image_spans=perf.check_image_spans,
        loss_at_label_positions=perf.loss_at_label_positions,
        liger_kernels=perf.liger_kernels,
        compile_vision=perf.compile_vision,
        compile_llm=perf.compile_llm,
        fp8=perf.fp8,
    )


def frozen_to_bf16(vlm) -> None:
    """Store every frozen float32 parameter in bf16 (peft's Q-LoRA preparation and modules loaded in fp32
    leave some): frozen weights never update, and autocast runs their matmuls in bf16 anyway."""
    for p in vlm.parameters():
        if p.dtype == torch.float32 and not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
