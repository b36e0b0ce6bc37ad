"""The recipe's ``perf`` section applied to a built VLM (the trainer and train.bench both call it).

Every switch computes the same loss as the plain path (tests/test_perf_*.py); measured gains are in
docs/benchmarks.md.
"""

from __future__ import annotations

import torch

from models.attention import set_attention


def apply_perf_switches(vlm, perf) -> None:
    """Apply a recipe's ``perf`` section (train.recipe.PerfSection) to a built VLM, after freezing,
    quantisation and LoRA (the trainer and this benchmark both call it). Checkpointing depth is set by
    ``VLM.set_gradient_checkpointing``. Compilation and liger kernels cannot be undone."""
    set_attention(vlm, perf.attention)
    vlm.loss_impl = perf.loss_impl
    vlm.check_image_spans = perf.check_image_spans
    if perf.frozen_bf16:
        # Frozen weights never update, and autocast runs their matmuls in bf16 anyway: fp32 storage only
        # costs memory (peft's Q-LoRA preparation upcasts embeddings, LM head and norms to fp32).
        for p in vlm.parameters():
            if p.dtype == torch.float32 and not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    if perf.liger_kernels and not getattr(vlm, "_liger_kernels", False):
        if vlm.llm.config.model_type != "qwen2":
            raise ValueError(f"perf.liger_kernels supports qwen2 decoders, not {vlm.llm.config.model_type}")
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False, model=vlm.llm)
        vlm._liger_kernels = True
    compile_vision = perf.compile_vision and not getattr(vlm, "_compiled_vision", False)
    compile_llm = perf.compile_llm and not getattr(vlm, "_compiled_llm", False)
    if compile_vision or compile_llm:
        vlm.compile_blocks(vision=compile_vision, llm=compile_llm)
        vlm._compiled_vision = getattr(vlm, "_compiled_vision", False) or compile_vision
        vlm._compiled_llm = getattr(vlm, "_compiled_llm", False) or compile_llm
