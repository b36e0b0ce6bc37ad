"""Compiled decoder layers inside the trainer's step: under non-reentrant activation checkpointing, with
packed rows whose length changes every step, with LoRA dropout, with the sample boundaries the collator
ships (varlen). This combination crashed in the first backward (CheckpointError: the recompute of a
compiled layer saved other tensors than its forward: the varlen boundaries were computed inside the first
layer and cached for the others, so layer 0's forward and its recompute ran different graphs)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import packed_batches


def lora_model(tiny_vlm, dropout: float):
    from train.lora import apply_lora
    from train.recipe import FreezeSection, LoraSection

    vlm = copy.deepcopy(tiny_vlm).train()
    freeze = FreezeSection(vision="frozen", resampler="train", llm="frozen", embeddings="frozen")
    from train.freeze import apply_freezing

    apply_freezing(vlm, freeze)
    vlm.set_gradient_checkpointing(True)
    model = apply_lora(
        vlm,
        LoraSection(enabled=True, r=4, alpha=8, dropout=dropout, targets=["q_proj", "v_proj", "gate_proj"]),
        freeze,
        gradient_checkpointing=True,
    )
    return model, vlm


def run_steps(model, batches, device, autocast: bool) -> list[float]:
    losses = []
    for batch in batches:
        inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(**inputs)
        out.loss_sum.backward()
        losses.append(float(out.loss_sum))
        model.zero_grad(set_to_none=True)
    return losses


@pytest.mark.slow
def test_compiled_layers_under_checkpointing_with_changing_row_lengths_cpu(tiny_vlm, tiny_tokenizer):
    """On the CPU the compiled graphs run through AOT autograd (the level where the recompute's saved
    tensors are checked) with the eager backend; losses equal the uncompiled model's."""
    torch._dynamo.reset()
    batches = packed_batches(tiny_vlm, tiny_tokenizer, [(20, 31), (44, 9, 17), (25,)])
    eager, _ = lora_model(tiny_vlm, dropout=0.0)
    compiled, vlm = lora_model(tiny_vlm, dropout=0.0)
    vlm.compile_blocks(vision=False, llm=True, backend="aot_eager")
    device = torch.device("cpu")
    torch.testing.assert_close(
        run_steps(compiled, batches, device, False),
        run_steps(eager, batches, device, False),
        rtol=1e-5,
        atol=1e-4,
    )
    with_dropout, vlm = lora_model(tiny_vlm, dropout=0.1)
    vlm.compile_blocks(vision=False, llm=True, backend="aot_eager")
    assert all(torch.isfinite(torch.tensor(run_steps(with_dropout, batches[:2], device, False))))


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (varlen flash attention, inductor)"
)
@pytest.mark.parametrize("liger", [False, True])
def test_compiled_varlen_layers_with_lora_dropout_under_checkpointing_gpu(tiny_vlm, tiny_tokenizer, liger):
    """The issue's crash, reproduced at tiny scale: varlen attention fed by the collator's boundaries,
    inductor-compiled decoder layers, every layer checkpointed, LoRA dropout,
    rows of a new length each step."""
    from train.perf import apply_perf_switches
    from train.recipe import PerfSection

    if liger:
        pytest.importorskip("liger_kernel", reason="liger-kernel is an optional dependency")
    torch._dynamo.reset()
    batches = packed_batches(tiny_vlm, tiny_tokenizer, [(20, 31), (44, 9, 17), (25,), (13, 40), (60, 5)])
    device = torch.device("cuda")
    perf = PerfSection(
        attention="varlen",
        loss_impl="auto",
        liger_kernels=liger,
        compile_llm=True,
        compile_vision=True,
        check_image_spans=False,
    )
    results = []
    for compile_ in (False, True):
        model, vlm = lora_model(tiny_vlm, dropout=0.0)
        model.cuda()
        apply_perf_switches(
            vlm, PerfSection(**{**perf.__dict__, "compile_llm": compile_, "compile_vision": compile_})
        )
        results.append(run_steps(model, batches, device, True))
    torch.testing.assert_close(results[1], results[0], rtol=2e-2, atol=2e-2)
    model, vlm = lora_model(tiny_vlm, dropout=0.05)
    model.cuda()
    apply_perf_switches(vlm, perf)
    assert all(torch.isfinite(torch.tensor(run_steps(model, batches, device, True))))
