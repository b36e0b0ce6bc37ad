"""perf.fp8 (models/fp8.py): the frozen linears' products in FP8 through torchao, opt-in. On a CPU: it refuses
in one log line where it cannot run, converts exactly the frozen nn.Linear layers of the decoder layers and
vision blocks (adapters, resampler, LM head untouched), keeps nothing but the frozen weight for backward,
computes no weight gradient, and (torchao's emulated FP8) moves a LoRA step's loss and gradients only by FP8
rounding. The tests of the conversion need torchao (the gpu extra) and are skipped without it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.test_perf_switches import _packed_batch
from train.freeze import apply_freezing
from train.lora import apply_lora
from train.perf import fp8_unavailable, resolve_perf
from train.recipe import FreezeSection, LoraSection, PerfSection


@pytest.mark.parametrize(
    "where, why",
    [
        (dict(cuda=False, capability=None), "no CUDA device"),
        (
            dict(cuda=True, capability=(8, 0)),
            "compute capability 8.0 has no FP8 tensor cores (needs 8.9",
        ),  # A100
        (dict(cuda=True, capability=(9, 0), quantized=True), "Q-LoRA's decoder linears are 4-bit"),
        (dict(cuda=True, capability=(9, 0), zero3=True), "not verified under ZeRO-3"),
        (
            dict(cuda=True, capability=(9, 0), installed=False),
            "torchao is not installed (pip install .[gpu])",
        ),
        (dict(cuda=True, capability=(9, 0), installed=True), ""),  # H100 / H200
        (dict(cuda=True, capability=(8, 9), installed=True), ""),  # L4 / L40 (Ada)
    ],
)
def test_fp8_runs_only_on_cards_with_fp8_tensor_cores(where, why):
    reason = fp8_unavailable(**where)
    assert reason.startswith(why) and (reason == "") == (why == "")


def test_on_a_cpu_perf_fp8_is_off_with_one_log_line(tiny_vlm):
    resolved, notes = resolve_perf(
        PerfSection(fp8=True, liger_kernels=False), tiny_vlm, cuda=False, quantized=False
    )
    assert resolved.fp8 is False and notes == ["perf.fp8: off (no CUDA device)"]
    assert (
        resolve_perf(PerfSection(), tiny_vlm, cuda=False, quantized=False)[0].fp8 is False
    )  # off by default


@pytest.fixture(scope="module")
def fp8():
    """models.fp8, which imports torchao: an optional heavy dependency (pip install .[gpu])."""
    pytest.importorskip("torchao")
    import models.fp8

    return models.fp8


def lora_model(tiny_vlm):
    """The tiny model as the LoRA recipe trains it: ViT and LLM frozen, resampler trained,
    adapters on the LLM."""
    model = copy.deepcopy(tiny_vlm).train()
    apply_freezing(
        model, FreezeSection(vision="frozen", resampler="train", llm="frozen", embeddings="frozen")
    )
    return apply_lora(
        model, LoraSection(enabled=True, r=8, alpha=16, dropout=0.0), FreezeSection(llm="frozen"), False
    )


def test_the_filter_takes_exactly_the_frozen_linears_of_the_decoder_layers_and_vision_blocks(tiny_vlm, fp8):
    wrapped = lora_model(tiny_vlm)
    vlm = wrapped.get_base_model()
    counts = fp8.convert_frozen_linears(vlm, emulate=True)
    converted = sorted(n for n, m in wrapped.named_modules() if isinstance(m, fp8.FrozenFloat8Linear))
    layer = ["mlp.down_proj"] + [
        f"{p}.base_layer"
        for p in (
            "mlp.gate_proj",
            "mlp.up_proj",
            "self_attn.k_proj",
            "self_attn.o_proj",
            "self_attn.q_proj",
            "self_attn.v_proj",
        )
    ]
    decoder = [n for n in converted if ".layers." in n]
    vision = [n for n in converted if ".vision.blocks." in n]
    assert counts == {"decoder": 2 * 7, "vision": 2 * 4} and len(converted) == len(decoder) + len(vision)
    assert sorted({n.split(".layers.")[1].split(".", 1)[1] for n in decoder}) == sorted(layer)
    assert sorted({n.split(".blocks.")[1].split(".", 1)[1] for n in vision}) == [
        "attn.proj",
        "attn.qkv",
        "mlp.fc1",
        "mlp.fc2",
    ]
    # what trains or is read by the loss stays as it was
    assert not any("lora_" in n or "resampler" in n or "lm_head" in n for n in converted)
    assert all(p.dtype == torch.float32 for n, p in wrapped.named_parameters() if "lora_" in n)


def test_the_filter_refuses_trainable_adapter_and_misaligned_linears(fp8):
    frozen_linear = fp8.frozen_linear
    frozen = nn.Linear(64, 32).requires_grad_(False)
    assert frozen_linear(frozen, "layers.0.mlp.down_proj")
    assert not frozen_linear(nn.Linear(64, 32), "layers.0.mlp.down_proj")  # trains
    assert not frozen_linear(frozen, "layers.0.q_proj.lora_A.default")  # an adapter
    assert not frozen_linear(nn.Linear(20, 32).requires_grad_(False), "x")  # 20 is not a multiple of 16
    assert not frozen_linear(nn.Conv2d(3, 16, 3).requires_grad_(False), "x")


def test_a_frozen_fp8_linear_keeps_only_its_weight_and_computes_no_weight_gradient(fp8):
    torch.manual_seed(0)
    plain = nn.Linear(64, 128, bias=False).requires_grad_(False)
    holder = nn.ModuleDict({"layer": copy.deepcopy(plain)})
    fp8.convert_to_float8_training(
        holder, module_filter_fn=fp8.frozen_linear, config=fp8.Float8LinearConfig(emulate=True)
    )
    holder["layer"].__class__ = fp8.FrozenFloat8Linear
    x = torch.randn(3, 10, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = holder["layer"](x)
    assert saved == [(64, 128)]  # the frozen weight (transposed view), not the [30, 64] input
    out.square().sum().backward()
    fp8_grad, x.grad = x.grad, None
    plain(x).square().sum().backward()
    assert holder["layer"].weight.grad is None
    # e4m3 keeps 3 mantissa bits: relative rounding up to 2^-4 per operand
    torch.testing.assert_close(out, plain(x), rtol=0, atol=0.1 * plain(x).abs().max().item())
    assert torch.nn.functional.cosine_similarity(fp8_grad.flatten(), x.grad.flatten(), dim=0) > 0.99


def test_a_lora_step_in_emulated_fp8_moves_loss_and_gradients_only_by_fp8_rounding(
    tiny_vlm, tiny_tokenizer, fp8
):
    input_ids, labels, positions, pixels = _packed_batch(tiny_vlm, tiny_tokenizer)
    runs = []
    for in_fp8 in (False, True):
        torch.manual_seed(1)  # the same adapters
        model = lora_model(tiny_vlm)
        if in_fp8:
            fp8.convert_frozen_linears(model.get_base_model(), emulate=True)
        out = model(input_ids, pixel_values=pixels, position_ids=positions, labels=labels)
        (out.loss_sum / out.num_tokens).backward()
        grads = {n: p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad}
        runs.append((out.loss_sum.item() / out.num_tokens.item(), grads))
    (loss, grads), (fp8_loss, fp8_grads) = runs
    assert fp8_loss == pytest.approx(loss, rel=0.02) and fp8_loss != loss
    assert grads.keys() == fp8_grads.keys() and any("lora_B" in n for n in grads)
    for name, g in grads.items():
        if g.norm() > 0:
            cosine = torch.nn.functional.cosine_similarity(g, fp8_grads[name], dim=0)
            assert cosine > 0.98, (name, cosine)


FP8_CARD = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.gpu
@pytest.mark.skipif(not FP8_CARD, reason="needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)")
@pytest.mark.parametrize("compiled", [False, True])
def test_on_an_fp8_card_a_bf16_lora_step_moves_only_by_fp8_rounding(tiny_vlm, tiny_tokenizer, fp8, compiled):
    """The real FP8 products (torch._scaled_mm), under bf16 autocast, eager and in compiled decoder layers."""
    batch = [t.cuda() for t in _packed_batch(tiny_vlm, tiny_tokenizer)]
    runs = []
    for in_fp8 in (False, True):
        torch.manual_seed(1)
        model = lora_model(tiny_vlm).cuda()
        vlm = model.get_base_model()
        if in_fp8:
            assert fp8.convert_frozen_linears(vlm) == {"decoder": 14, "vision": 8}
        if compiled:
            vlm.set_gradient_checkpointing(True)
            vlm.compile_blocks(vision=False, llm=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(batch[0], pixel_values=batch[3], position_ids=batch[2], labels=batch[1])
        (out.loss_sum / out.num_tokens).backward()
        grads = {n: p.grad.flatten().float() for n, p in model.named_parameters() if p.requires_grad}
        runs.append((out.loss_sum.item() / out.num_tokens.item(), grads))
    (loss, grads), (fp8_loss, fp8_grads) = runs
    assert fp8_loss == pytest.approx(loss, rel=0.02)
    for name, g in grads.items():
        if g.norm() > 0:
            assert torch.nn.functional.cosine_similarity(g, fp8_grads[name], dim=0) > 0.97, name
