"""The performance switches of the model compute the same thing as the plain path (CPU, tiny model).

The GPU-only switches (liger fused loss, flex / varlen attention, torch.compile) are pinned in
tests/test_perf_equivalence.py.
"""

import copy
import importlib.util

import pytest
import torch

from models import loss as loss_mod
from models.decoder_layers import checkpointed_layer_indices, is_checkpointed
from models.loss import causal_lm_loss_sum
from models.tokens import image_token_ids


def _labels(vocab: int, shape, gen) -> torch.Tensor:
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < 0.4] = -100
    return labels


def test_chunked_loss_equals_full_logits_loss_and_grads(monkeypatch):
    monkeypatch.setattr(loss_mod, "CHUNK_TOKENS", 7)  # several chunks, the last one ragged
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 20, 16, generator=gen)
    weight = torch.randn(50, 16, generator=gen)
    labels = _labels(50, (2, 20), gen)
    results = []
    for impl in ("torch", "chunked"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss_sum, n = causal_lm_loss_sum(h, w, labels, impl=impl)
        loss_sum.backward()
        results.append((loss_sum, n, h.grad, w.grad))
    for a, b in zip(*results):  # fp32, summed in a different order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_the_loss_at_the_supervised_positions_only_equals_the_loss_over_every_position(impl, monkeypatch):
    """perf.loss_at_label_positions: the LM head runs only where a label is predicted (the collator's
    label_positions); loss, token count and the gradients of hidden states and head are unchanged."""
    from data.packing import supervised_positions

    monkeypatch.setattr(loss_mod, "CHUNK_TOKENS", 5)
    gen = torch.Generator().manual_seed(2)
    hidden, weight, labels = (
        torch.randn(3, 12, 16, generator=gen),
        torch.randn(40, 16, generator=gen),
        _labels(40, (3, 12), gen),
    )
    labels[1, 0] = 7  # a label in column 0 is never predicted: nothing precedes it in its row
    positions = supervised_positions(labels)
    assert 12 not in positions.tolist() and len(positions) == int((labels[:, 1:] != -100).sum())
    results = []
    for label_positions in (None, positions):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss_sum, n = causal_lm_loss_sum(h, w, labels, impl=impl, label_positions=label_positions)
        loss_sum.backward()
        results.append((loss_sum, n, h.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_unknown_loss_impl_is_rejected():
    with pytest.raises(ValueError, match="loss impl 'fast'"):
        causal_lm_loss_sum(
            torch.zeros(1, 2, 4), torch.zeros(3, 4), torch.zeros(1, 2, dtype=torch.long), impl="fast"
        )


def test_auto_loss_impl_falls_back_to_chunked_on_cpu():
    gen = torch.Generator().manual_seed(1)
    hidden, weight, labels = (
        torch.randn(1, 9, 8, generator=gen),
        torch.randn(30, 8, generator=gen),
        _labels(30, (1, 9), gen),
    )
    torch.testing.assert_close(
        causal_lm_loss_sum(hidden, weight, labels, impl="auto"),
        causal_lm_loss_sum(hidden, weight, labels, impl="torch"),
    )


@pytest.mark.parametrize(
    "layers,count,expected", [(4, 4, {0, 1, 2, 3}), (4, 2, {0, 2}), (32, 0, set()), (6, 3, {0, 2, 4})]
)
def test_checkpointed_layers_are_spread_evenly(layers, count, expected):
    assert checkpointed_layer_indices(layers, count) == expected


def test_checkpointing_more_layers_than_exist_is_an_error():
    with pytest.raises(ValueError, match="cannot checkpoint 5 of 4"):
        checkpointed_layer_indices(4, 5)


def _packed_batch(model, tok):
    """Two samples with one image each, packed in one row with tail padding."""
    n = model.config.num_image_tokens
    ids = image_token_ids(tok)
    span = [ids.start] + [ids.pad] * n + [ids.end]
    a = span + tok("A photo of a dog running on the beach", add_special_tokens=False)["input_ids"]
    b = tok("Question: what color is the bus?", add_special_tokens=False)["input_ids"] + span
    row = a + b + [tok.pad_token_id] * 2
    labels = torch.tensor(row)
    labels[labels == ids.pad] = -100
    labels[[0, len(a), len(a) + len(b), len(a) + len(b) + 1]] = -100
    positions = torch.cat([torch.arange(len(a)), torch.arange(len(b)), torch.arange(2)])
    pixels = torch.randn(2, 3, 84, 84, generator=torch.Generator().manual_seed(0))
    return torch.tensor([row]), labels[None], positions[None], pixels


def test_selective_checkpointing_and_chunked_loss_keep_packed_loss_and_grads(
    tiny_vlm, tiny_tokenizer, monkeypatch
):
    monkeypatch.setattr(loss_mod, "CHUNK_TOKENS", 16)
    input_ids, labels, positions, pixels = _packed_batch(tiny_vlm, tiny_tokenizer)
    runs = []
    for loss_impl, llm_layers in (("torch", None), ("chunked", 1), ("chunked", 0)):
        model = copy.deepcopy(tiny_vlm).train()
        model.runtime.loss_impl = loss_impl
        model.set_gradient_checkpointing(True, llm_layers=llm_layers)
        out = model(input_ids, pixel_values=pixels, position_ids=positions, labels=labels)
        out.loss_sum.backward()
        flags = [is_checkpointed(layer) for layer in model.llm.get_decoder().layers]
        assert sum(flags) == (len(flags) if llm_layers is None else llm_layers)
        runs.append((out.loss_sum.detach(), {n: p.grad for n, p in model.named_parameters()}))
    for loss_sum, grads in runs[1:]:  # fp32, the loss summed in a different order
        torch.testing.assert_close(loss_sum, runs[0][0], rtol=1e-5, atol=1e-4)
        for name, g in runs[0][1].items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_frozen_vision_tower_builds_no_graph_but_the_resampler_still_learns(tiny_vlm, tiny_tokenizer):
    """Stage 3 style (ViT frozen, resampler trains): the ViT runs without autograd state."""
    model = copy.deepcopy(tiny_vlm).train()
    model.vision.requires_grad_(False)
    seen = {}
    model.vision.register_forward_hook(lambda m, i, o: seen.update(vision_out=o))
    input_ids, labels, positions, pixels = _packed_batch(model, tiny_tokenizer)
    out = model(input_ids, pixel_values=pixels, position_ids=positions, labels=labels)
    out.loss_sum.backward()
    assert seen["vision_out"].grad_fn is None and not seen["vision_out"].requires_grad
    assert model.resampler.query.grad is not None and model.resampler.query.grad.abs().sum() > 0


def test_frozen_llm_still_backpropagates_into_the_resampler(tiny_vlm, tiny_tokenizer):
    """Stage 1 (LLM frozen, ViT + resampler train): gradients flow through the frozen decoder."""
    model = copy.deepcopy(tiny_vlm).train()
    model.llm.requires_grad_(False)
    input_ids, labels, positions, pixels = _packed_batch(model, tiny_tokenizer)
    model(input_ids, pixel_values=pixels, position_ids=positions, labels=labels).loss_sum.backward()
    assert model.resampler.proj.grad.abs().sum() > 0 and model.vision.patch_embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.llm.parameters())


def test_span_check_switch_only_skips_the_check(tiny_vlm, tiny_tokenizer):
    model = copy.deepcopy(tiny_vlm)
    input_ids, labels, positions, pixels = _packed_batch(model, tiny_tokenizer)
    with pytest.raises(ValueError, match="batch row 0"):
        model(input_ids, pixel_values=pixels[:1], position_ids=positions, labels=labels)
    model.runtime.check_image_spans = False
    with torch.no_grad():
        a = model(input_ids, pixel_values=pixels, position_ids=positions, labels=labels).loss_sum
    model.runtime.check_image_spans = True
    with torch.no_grad():
        b = model(input_ids, pixel_values=pixels, position_ids=positions, labels=labels).loss_sum
    torch.testing.assert_close(a, b)


def test_recipe_perf_section_reaches_the_model(tiny_vlm):
    """The trainer's path: recipe `perf` keys -> PerfSection -> resolve_perf -> apply_perf_switches."""
    from train.perf import apply_perf_switches, resolve_perf
    from train.recipe import PerfSection

    model = copy.deepcopy(tiny_vlm)
    perf, notes = resolve_perf(
        PerfSection(
            loss_impl="chunked",
            check_image_spans=False,
            liger_kernels="auto",
            compile_llm="auto",
            compile_vision="auto",
        ),
        model,
        cuda=False,
        quantized=False,
    )
    apply_perf_switches(model, perf)
    assert model.runtime.loss_impl == "chunked" and model.runtime.check_image_spans is False
    # Without CUDA every "auto" resolves to off, each with one line saying why.
    assert (perf.liger_kernels, perf.compile_llm, perf.compile_vision) == (False, False, False)
    assert len(notes) == 3 and all("auto -> off" in n and "no CUDA device" in n for n in notes)


def test_quantized_models_never_compile_their_decoder(tiny_vlm):
    from train.perf import resolve_perf
    from train.recipe import PerfSection

    perf, notes = resolve_perf(PerfSection(compile_llm="auto"), tiny_vlm, cuda=True, quantized=True)
    assert perf.compile_llm is False and any("4-bit" in n for n in notes)


def test_unresolved_auto_is_refused(tiny_vlm):
    from train.perf import apply_perf_switches
    from train.recipe import PerfSection

    with pytest.raises(ValueError, match="resolved"):
        apply_perf_switches(copy.deepcopy(tiny_vlm), PerfSection(liger_kernels="auto"))


def test_recipe_rejects_unknown_perf_values():
    from train.recipe import RecipeError, recipe_from_dict

    raw = {"model": {"preset": "tiny"}, "train": {"steps": 1}, "data": {"paths": ["x.json"]}}
    recipe = recipe_from_dict({**raw, "perf": {"attention": "varlen", "checkpoint_llm_layers": 24}})
    assert recipe.perf.attention == "varlen" and recipe.perf.checkpoint_llm_layers == 24
    with pytest.raises(RecipeError, match="perf.attention"):
        recipe_from_dict({**raw, "perf": {"attention": "flash"}})


def test_varlen_attention_falls_back_to_sdpa_for_padded_batches_and_generation(tiny_vlm, tiny_tokenizer):
    """perf.attention=varlen must not change what a padded batch or cached generation computes (the
    varlen kernel itself is CUDA-only and pinned in tests/test_perf_equivalence.py)."""
    pytest.importorskip("torch.nn.attention.varlen", reason="torch without varlen attention")
    from models.attention import set_attention

    tok = tiny_tokenizer
    rows = [
        tok("A red car is parked near the water.", add_special_tokens=False)["input_ids"],
        tok("The cat sleeps.", add_special_tokens=False)["input_ids"],
    ]
    width = max(map(len, rows))
    left = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    left_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    right = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    right_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = right.masked_fill(right_mask == 0, -100)
    results = []
    for attn in ("sdpa", "varlen"):
        model = copy.deepcopy(tiny_vlm)
        set_attention(model, attn)
        with torch.no_grad():
            loss = model(right, attention_mask=right_mask, labels=labels).loss_sum
        new = model.generate(
            left, attention_mask=left_mask, max_new_tokens=4, do_sample=False, eos_token_id=None
        )
        results.append((loss, new))
    torch.testing.assert_close(results[1][0], results[0][0])
    assert torch.equal(results[1][1], results[0][1])


def test_dpo_with_the_adapter_disabled_reference_never_compiles_its_decoder(tiny_vlm):
    """The reference pass runs the same compiled layers with the adapters off; their checkpointed recompute
    then saved other tensors than the forward (CheckpointError on the H100), so auto keeps them eager."""
    from train.perf import resolve_perf
    from train.recipe import PerfSection

    perf, notes = resolve_perf(
        PerfSection(compile_llm="auto"), tiny_vlm, cuda=True, quantized=False, adapter_off_reference=True
    )
    assert perf.compile_llm is False and any("adapter-disabled reference" in n for n in notes)


def test_liger_kernels_stay_off_where_the_decoder_layers_compile(tiny_vlm):
    """Inductor fuses RMSNorm, RoPE and SwiGLU inside the compiled layers itself, and liger's RoPE breaks
    their graph (12% slower on the H100); liger stays on where nothing compiles the decoder (Q-LoRA)."""
    from train.perf import resolve_perf
    from train.recipe import PerfSection

    auto = PerfSection(liger_kernels="auto", compile_llm="auto")
    compiled, notes = resolve_perf(auto, tiny_vlm, cuda=True, quantized=False)
    assert compiled.compile_llm is True and compiled.liger_kernels is False
    assert any("liger_kernels" in n and "compile" in n for n in notes)
    quantized, _ = resolve_perf(auto, tiny_vlm, cuda=True, quantized=True)
    assert quantized.compile_llm is False and quantized.liger_kernels is (
        importlib.util.find_spec("liger_kernel") is not None
    )


def test_liger_kernels_stay_on_the_model_they_were_applied_to(tiny_vlm, tiny_tokenizer):
    """liger rebinds transformers' Qwen2 classes and RoPE for the whole process; a model built afterwards (an
    export loaded on the CPU for chat after training) must still run transformers' own code there."""
    pytest.importorskip("liger_kernel", reason="liger-kernel is an optional dependency (pip install .[gpu])")
    from transformers.models.qwen2 import modeling_qwen2 as qwen2

    from models import build_vlm, presets
    from models.liger import apply_liger_to

    norm_class, mlp_class = qwen2.Qwen2RMSNorm, qwen2.Qwen2MLP
    apply_liger_to(copy.deepcopy(tiny_vlm).llm)
    assert (qwen2.Qwen2RMSNorm, qwen2.Qwen2MLP) == (norm_class, mlp_class)
    torch.manual_seed(0)
    later = build_vlm(presets.tiny(vocab_size=len(tiny_tokenizer)), tokenizer=tiny_tokenizer).eval()
    ids = torch.tensor([tiny_tokenizer("a red square")["input_ids"]])
    torch.testing.assert_close(later(ids).logits, tiny_vlm(ids).logits)  # runs on the CPU, as transformers
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    cos, sin = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    rope = qwen2.apply_rotary_pos_emb.transformers_rope
    for got, want in zip(qwen2.apply_rotary_pos_emb(q, k, cos, sin), rope(q, k, cos, sin)):
        assert torch.equal(got, want)


def test_offloading_activations_needs_cuda_and_says_so_where_it_is_off(tiny_vlm):
    """perf.offload_activations (sft_lora.yaml) parks saved tensors in pinned host memory through CUDA copy
    streams: on a CPU run the trainer turns it off with one line, and its engine offloads nothing."""
    from train.parallel import DistInfo, Engine
    from train.perf import resolve_perf
    from train.recipe import ParallelSection, PerfSection, TrainSection

    on = PerfSection(offload_activations=True)
    assert resolve_perf(on, tiny_vlm, cuda=True, quantized=False)[0].offload_activations is True
    cpu, notes = resolve_perf(on, tiny_vlm, cuda=False, quantized=False)
    assert cpu.offload_activations is False and "perf.offload_activations: off (no CUDA device)" in notes
    model = copy.deepcopy(tiny_vlm)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = Engine(
        model,
        optimizer,
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")),
        ParallelSection(),
        TrainSection(),
        clip_grad=1.0,
        offload_activations=on.offload_activations,
    )
    assert engine.offload is None


def test_varlen_attention_is_sdpa_on_a_cpu_with_one_line(tiny_vlm, tiny_tokenizer):
    """torch's varlen kernel is flash attention, CUDA-only (on a CPU: "aten::_flash_attention_forward" has no
    backend). A recipe asking for varlen (recipes/sft.yaml, the family recipes) trains on a CPU with SDPA,
    which keeps each packed sample to itself through the mask transformers builds from the restarting
    positions."""
    from train.perf import apply_perf_switches, resolve_perf
    from train.recipe import PerfSection

    varlen = PerfSection(attention="varlen")
    assert resolve_perf(varlen, tiny_vlm, cuda=True, quantized=False)[0].attention == "varlen"
    cpu, notes = resolve_perf(varlen, tiny_vlm, cuda=False, quantized=False)
    assert cpu.attention == "sdpa" and any(n.startswith("perf.attention: varlen -> sdpa") for n in notes)
    model = copy.deepcopy(tiny_vlm)
    apply_perf_switches(model, cpu)
    ids, labels, positions, pixels = _packed_batch(model, tiny_tokenizer)
    with torch.no_grad():
        out = model(ids, pixel_values=pixels, position_ids=positions, labels=labels)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("compile_llm", [False, True])
def test_fused_lora_forwards_go_only_where_the_blocks_do_not_compile(tiny_vlm, compile_llm):
    """perf.fused_lora: Q-LoRA's and DPO's eager decoder layers run the fused LoRA forward; compiled layers
    keep peft's, whose element-wise work inductor fuses (measured slower fused there, docs/benchmarks.md).
    The vision tower's adapters follow the vision blocks' compilation alike."""
    from train.freeze import apply_freezing
    from train.lora import apply_lora
    from train.perf import apply_perf_switches
    from train.recipe import FreezeSection, LoraSection, PerfSection

    freeze = FreezeSection(vision="frozen", resampler="train", llm="frozen")
    base = copy.deepcopy(tiny_vlm)
    apply_freezing(base, freeze)
    model = apply_lora(
        base, LoraSection(enabled=True, r=4, targets=["q_proj"], vision_targets=["attn.qkv"]), freeze
    )
    vlm = model.get_base_model()
    apply_perf_switches(vlm, PerfSection(liger_kernels=False, compile_llm=compile_llm, compile_vision=False))
    fused = {name.split(".")[0] for name, m in vlm.named_modules() if getattr(m, "_vlrecipe_fused", False)}
    assert fused == ({"vision"} if compile_llm else {"llm", "vision"})
    torch.backends.cuda.enable_cudnn_sdp(True)
    plain = copy.deepcopy(tiny_vlm)
    apply_perf_switches(plain, PerfSection(liger_kernels=False, fused_lora=False))
    assert not any(getattr(m, "_vlrecipe_fused", False) for m in plain.modules())
    assert torch.backends.cuda.cudnn_sdp_enabled() is False  # perf.cudnn_attention: False by default
    apply_perf_switches(plain, PerfSection(liger_kernels=False, cudnn_attention=True))
    assert torch.backends.cuda.cudnn_sdp_enabled() is True
