"""Liger's fused kernels (RMSNorm, SwiGLU, RoPE) in one Qwen2 decoder, without changing any other model of
the process (``VLM.set_runtime`` applies them for ``RuntimeOptions.liger_kernels``)."""

from __future__ import annotations

from transformers.models.qwen2 import modeling_qwen2 as qwen2


def apply_liger_to(llm) -> None:
    """Liger's RMSNorm, SwiGLU and RoPE kernels on this Qwen2 decoder only.

    apply_liger_kernel_to_qwen2 also rebinds transformers' module-level Qwen2RMSNorm, Qwen2MLP and
    apply_rotary_pos_emb, so every Qwen2 model built afterwards in the process ran Triton kernels, on CPU
    tensors too (a trained adapter loaded on the CPU for chat failed: "Pointer argument cannot be accessed
    from Triton"). The classes are put back; RoPE is looked up by name at every call, so the module keeps a
    dispatcher that sends CUDA tensors to liger and the rest to transformers' function."""
    # liger-kernel is an optional heavy dependency (the gpu extra): imported only when its kernels are used.
    from liger_kernel.transformers import apply_liger_kernel_to_qwen2

    classes = {name: getattr(qwen2, name) for name in ("Qwen2RMSNorm", "Qwen2MLP")}
    rope = getattr(qwen2.apply_rotary_pos_emb, "transformers_rope", qwen2.apply_rotary_pos_emb)
    apply_liger_kernel_to_qwen2(
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
        model=llm,
    )
    liger_rope = qwen2.apply_rotary_pos_emb
    for name, cls in classes.items():
        setattr(qwen2, name, cls)

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        return (liger_rope if q.is_cuda else rope)(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.transformers_rope = rope
    qwen2.apply_rotary_pos_emb = apply_rotary_pos_emb
