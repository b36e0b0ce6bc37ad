"""The shipped speed switches on the HF VLM families (train.assemble.HFFamily.apply_perf), each pinned to the
plain path's loss and gradients on a tiny family model in fp32, as tests/test_perf_*.py pin them for the
Qwen-VL model: fused LoRA forwards, compiled decoder layers under checkpointing with packed rows whose length
changes every step, and how the recipe's perf section resolves on a CPU (varlen attention, the switches that
stay off for families)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from data.hf_collate import collate_family_batch
from data.packing import supervised_positions
from models.attention import VISION_VARLEN, set_vision_varlen
from models.errors import UserError
from models.families.adapter import HFFamilyModel
from tests.test_model_families_training import family  # noqa: F401 (the tiny model and samples of each family)
from tests.test_train_world import TINY
from train.assemble import FAMILIES, FAMILY_SWITCHES_OFF
from train.freeze import apply_freezing
from train.lora import apply_lora
from train.recipe import FreezeSection, LoraSection, load_recipe

FREEZE = FreezeSection(vision="frozen", resampler="train", llm="frozen", embeddings="frozen")
LORA = LoraSection(
    enabled=True, r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "gate_proj", "down_proj"]
)


def family_recipe(spec_name: str, tiktoken, *overrides: str):
    return load_recipe(
        TINY / "qwen2_5_vl_sft.yaml",
        [
            f"model.family={spec_name}",
            f"model.preset={spec_name}_tiny",
            f"model.tokenizer_path={tiktoken}",
            "lora.enabled=true",
            "freeze.llm=frozen",
            "freeze.embeddings=frozen",
            *overrides,
        ],
    )


def lora_model(model: HFFamilyModel):
    """LoRA on the LLM's projections (the down projection's too) with every decoder layer checkpointed, as
    the family's LoRA recipe trains it."""
    vlm = copy.deepcopy(model).train()
    apply_freezing(vlm, FREEZE)
    vlm.set_gradient_checkpointing(True)
    torch.manual_seed(0)  # the same adapters' initial weights for every copy
    return apply_lora(vlm, LORA, FREEZE, gradient_checkpointing=True), vlm


def packed_rows(items, pad_id: int) -> list[dict]:
    """Two steps of packed rows of different lengths: all three samples, then the first two."""
    return [
        collate_family_batch(chosen, pad_id, pack_to=sum(len(s.input_ids) for s, _ in chosen) + extra)
        for chosen, extra in ((items, 5), (items[:2], 2))
    ]


def losses_and_grads(model, batches) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    losses, grads = [], []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss_sum.backward()
        losses.append(out.loss_sum.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    return losses, grads


def assert_same(got, expected, rtol: float, atol: float) -> None:
    (losses, grads), (want_losses, want_grads) = got, expected
    torch.testing.assert_close(losses, want_losses, rtol=rtol, atol=atol)
    for step, want in enumerate(want_grads):
        assert grads[step].keys() == want.keys()
        for name, grad in want.items():
            torch.testing.assert_close(
                grads[step][name], grad, rtol=rtol, atol=atol, msg=lambda m, s=step, n=name: f"{s}: {n}: {m}"
            )


def test_fused_lora_forwards_keep_packed_loss_and_gradients(family, tiny_tiktoken):  # noqa: F811
    model, processor, items = family
    batches = packed_rows(items, processor.tokenizer.pad_token_id)
    plain, _ = lora_model(model)
    expected = losses_and_grads(plain, batches)

    fused, vlm = lora_model(model)
    recipe = family_recipe(model.spec.name, tiny_tiktoken, "perf.fused_lora=true")
    perf, _ = FAMILIES[model.spec.name].apply_perf(vlm, recipe, cuda=False, mode="single")
    assert perf.fused_lora and not perf.compile_llm
    fused_layers = [n for n, m in fused.named_modules() if getattr(m, "_vlrecipe_fused", False)]
    assert len(fused_layers) == 4 * len(vlm.hf.get_decoder().layers)
    assert all(".language_model." in n for n in fused_layers)
    # The projector trains in full beside the adapters: Qwen3-VL's DeepStack mergers (a list) too.
    deepstack = [n for n, p in fused.named_parameters() if ".deepstack_merger_list." in n and p.requires_grad]
    assert bool(deepstack) == (model.spec.name == "qwen3_vl")
    assert_same(losses_and_grads(fused, batches), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_decoder_layers_under_checkpointing_with_changing_row_lengths(family):  # noqa: F811
    """On the CPU the compiled graphs run through AOT autograd (where the recompute's saved tensors are
    checked against the forward's) with the eager backend."""
    torch._dynamo.reset()
    model, processor, items = family
    batches = packed_rows(items, processor.tokenizer.pad_token_id)
    plain, _ = lora_model(model)
    expected = losses_and_grads(plain, batches)
    compiled, vlm = lora_model(model)
    vlm.compile_llm_layers(backend="aot_eager")
    assert_same(losses_and_grads(compiled, batches), expected, rtol=1e-5, atol=1e-5)


def test_on_a_cpu_the_family_recipes_perf_section_resolves_with_one_line_each(
    family,  # noqa: F811 (the fixture imported above)
    tiny_tiktoken,
    monkeypatch,
):
    """The family recipes' perf line on a CPU: varlen attention (a CUDA kernel) becomes SDPA, which keeps each
    packed sample to itself too; "auto" switches that need CUDA or are off for families say so; an explicit
    compile_llm compiles the decoder layers."""
    model, _, _ = family
    vlm = copy.deepcopy(model)
    recipe = family_recipe(
        model.spec.name,
        tiny_tiktoken,
        "perf.attention=varlen",
        "perf.loss_impl=auto",
        "perf.liger_kernels=auto",
        "perf.compile_llm=auto",
        "perf.compile_vision=auto",
    )
    perf, notes = FAMILIES[model.spec.name].apply_perf(vlm, recipe, cuda=False, mode="single")
    assert perf.attention == "sdpa" and vlm.hf.model.language_model.config._attn_implementation == "sdpa"
    assert (perf.liger_kernels, perf.compile_llm, perf.compile_vision) == (False, False, False)
    assert any(n.startswith("perf.attention: varlen -> sdpa") for n in notes)
    assert any(n.startswith("perf.compile_llm: auto -> off (no CUDA device") for n in notes)
    assert any(n.startswith("perf.liger_kernels: off for") for n in notes)
    fp8, notes = FAMILIES[model.spec.name].apply_perf(
        vlm, family_recipe(model.spec.name, tiny_tiktoken, "perf.fp8=true"), cuda=False, mode="single"
    )
    assert fp8.fp8 is False and "perf.fp8: off (no CUDA device)" in notes

    compiled = []
    monkeypatch.setattr(HFFamilyModel, "compile_llm_layers", lambda self: compiled.append(self))
    explicit = family_recipe(model.spec.name, tiny_tiktoken, "perf.compile_llm=true")
    FAMILIES[model.spec.name].apply_perf(vlm, explicit, cuda=False, mode="single")
    assert compiled == [vlm]


@pytest.mark.parametrize("switch", sorted(FAMILY_SWITCHES_OFF))
def test_a_switch_not_available_for_families_is_refused_when_asked_for(switch, tiny_tiktoken):
    vlm = HFFamilyModel.from_preset("qwen2_5_vl_tiny")
    recipe = family_recipe("qwen2_5_vl", tiny_tiktoken, f"perf.{switch}=true")
    with pytest.raises(UserError, match=f"perf.{switch} is not available for model.family qwen2_5_vl yet"):
        FAMILIES["qwen2_5_vl"].apply_perf(vlm, recipe, cuda=False, mode="single")


def test_the_full_logit_loss_of_the_plain_anchor_is_honoured(family, tiny_tiktoken, monkeypatch):  # noqa: F811
    """train.bench's plain variant sets perf.loss_at_label_positions=false: the LM head and loss then run at
    every position, as Hugging Face trains, though the collator ships the supervised positions; the loss is
    the same either way."""
    import models.vlm as vlm_module

    model, processor, items = family
    vlm = copy.deepcopy(model)
    batch = collate_family_batch(items, processor.tokenizer.pad_token_id)
    batch["label_positions"] = supervised_positions(batch["labels"])  # as data.collate ships them
    losses, seen = [], []
    loss_sum = vlm_module.causal_lm_loss_sum

    def recording(*args, label_positions=None, **kwargs):
        seen.append(label_positions is not None)
        return loss_sum(*args, label_positions=label_positions, **kwargs)

    monkeypatch.setattr(vlm_module, "causal_lm_loss_sum", recording)  # models.vlm.lm_output calls it
    for setting in ("true", "false"):
        recipe = family_recipe(model.spec.name, tiny_tiktoken, f"perf.loss_at_label_positions={setting}")
        FAMILIES[model.spec.name].apply_perf(vlm, recipe, cuda=False, mode="single")
        with torch.no_grad():
            losses.append(vlm(**batch).loss_sum)
    assert seen == [True, False]
    torch.testing.assert_close(losses[0], losses[1])


BF16_FEATURES = {"rtol": 2e-2, "atol": 2e-3}


def segment_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, is_causal=None, window_size=None):
    """torch's varlen_attn as plain SDPA over each segment ([tokens, heads, dim] in and out): a CPU stand-in
    that keeps the kernel's contract (boundaries, scale, causal or not)."""
    causal = is_causal if is_causal is not None else tuple(window_size) == (-1, 0)
    parts = []
    for start, end in zip(cu_q.tolist(), cu_q.tolist()[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)
        parts.append(out.transpose(0, 1))
    return torch.cat(parts)


def test_varlen_runs_the_vision_tower_in_one_call_per_block_confined_to_each_image(family, monkeypatch):  # noqa: F811
    """perf.attention: varlen also runs the ViT through the varlen kernel: transformers hands it every image's
    boundaries (Qwen2.5-VL: its windows') in one non-causal call per block, where its SDPA path makes one
    call per image after a host sync in every block. The features equal the SDPA tower's."""
    import models.attention

    model, _, items = family
    batch = collate_family_batch(items, 0)
    pixels, grid = batch["pixel_values"], batch["image_grid_thw"]
    assert len(grid) >= 2, "the test needs images of several sizes in one call"
    visual = copy.deepcopy(model).eval().hf.model.visual
    with torch.no_grad():
        want = visual(pixels, grid_thw=grid, return_dict=True).last_hidden_state

    calls = []

    def kernel(*args, **kwargs):
        calls.append(kwargs.get("is_causal", kwargs.get("window_size")))
        return segment_attention(*args, **kwargs)

    monkeypatch.setattr(models.attention, "varlen_attn", kernel)
    set_vision_varlen(visual.config)
    with torch.no_grad():
        got = visual(pixels, grid_thw=grid, return_dict=True).last_hidden_state
    assert len(calls) == len(visual.blocks)
    assert all(c in (False, (-1, -1)) for c in calls), calls
    # the kernel takes bf16 (flash), so the features agree to bf16 rounding; attending across the images'
    # boundaries would move them far more than that (checked with one segment for the whole batch)
    torch.testing.assert_close(got, want, **BF16_FEATURES)

    def unconfined(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        whole = cu_q.new_tensor([0, len(q)])
        return segment_attention(q, k, v, whole, whole, len(q), len(q), **kwargs)

    monkeypatch.setattr(models.attention, "varlen_attn", unconfined)
    with torch.no_grad():
        leaked = visual(pixels, grid_thw=grid, return_dict=True).last_hidden_state
    with pytest.raises(AssertionError):
        torch.testing.assert_close(leaked, want, **BF16_FEATURES)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (varlen flash attention, inductor)"
)
def test_compiled_varlen_family_layers_under_checkpointing_gpu(family, tiny_tiktoken):  # noqa: F811
    """The LoRA recipe's switches as one GPU runs them: varlen attention on the collator's boundaries,
    inductor-compiled decoder layers, every layer checkpointed, the fused loss, bf16 autocast; over packed
    rows of changing length the losses stay within bf16 rounding of the plain path (SDPA, eager layers)."""
    torch._dynamo.reset()
    model, processor, items = family
    batches = [
        {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        for batch in packed_rows(items, processor.tokenizer.pad_token_id)
    ]
    on_gpu = copy.deepcopy(model).cuda()
    plain, _ = lora_model(on_gpu)
    optimised, vlm = lora_model(on_gpu)
    recipe = family_recipe(
        model.spec.name,
        tiny_tiktoken,
        "perf.attention=varlen",
        "perf.compile_llm=auto",
        "perf.loss_impl=auto",
    )
    perf, _ = FAMILIES[model.spec.name].apply_perf(vlm, recipe, cuda=True, mode="single")
    assert perf.attention == "varlen" and perf.compile_llm is True
    assert vlm.hf.model.visual.config._attn_implementation == VISION_VARLEN
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want, _ = losses_and_grads(plain, batches)
        got, _ = losses_and_grads(optimised, batches)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-2)


def test_a_lora_step_in_emulated_fp8_moves_loss_and_gradients_only_by_fp8_rounding(family):  # noqa: F811
    """perf.fp8 on a family: the frozen linears of the decoder layers and the ViT blocks become FP8 products
    (torchao's emulation on a CPU), the adapters and the merger do not; the loss moves by FP8 rounding only.
    On a CPU the trainer itself turns perf.fp8 off (train.perf.fp8_unavailable)."""
    pytest.importorskip("torchao", reason="torchao is an optional dependency (pip install .[gpu])")
    from models.fp8 import FrozenFloat8Linear, convert_frozen_linears

    model, processor, items = family
    batches = packed_rows(items, processor.tokenizer.pad_token_id)[:1]
    runs = []
    for in_fp8 in (False, True):
        wrapped, vlm = lora_model(model)
        if in_fp8:
            counts = convert_frozen_linears(vlm, emulate=True)
            converted = [n for n, m in wrapped.named_modules() if isinstance(m, FrozenFloat8Linear)]
            assert counts["decoder"] > 0 and counts["vision"] > 0
            assert all(".language_model.layers." in n or ".visual.blocks." in n for n in converted)
        losses, grads = losses_and_grads(wrapped, batches)
        runs.append((losses[0].item(), grads[0]))
    (loss, grads), (fp8_loss, fp8_grads) = runs
    assert fp8_loss == pytest.approx(loss, rel=0.02) and fp8_loss != loss
    assert grads.keys() == fp8_grads.keys() and any("lora_B" in n for n in grads)
    for name, g in grads.items():
        if g.norm() > 0:
            cosine = torch.nn.functional.cosine_similarity(g.flatten(), fp8_grads[name].flatten(), dim=0)
            assert cosine > 0.98, (name, cosine)


def test_outside_training_checkpointed_and_compiled_layers_generate_as_the_plain_model(family):  # noqa: F811
    """Evaluation during a run (eval.benches) generates with the trained model: its decoder layers, installed
    for checkpointing and compiled (models.decoder_layers), then run their own forward with the KV cache."""
    torch._dynamo.reset()
    model, processor, items = family
    batch = collate_family_batch(items[1:2], processor.tokenizer.pad_token_id)
    prompt = {k: batch[k] for k in ("input_ids", "pixel_values", "image_grid_thw")}
    kwargs = dict(max_new_tokens=5, do_sample=False, eos_token_id=None)
    plain = copy.deepcopy(model).eval()
    switched = copy.deepcopy(model)
    switched.set_gradient_checkpointing(True)
    switched.compile_llm_layers(backend="aot_eager")
    switched.eval()
    assert torch.equal(switched.generate(**prompt, **kwargs), plain.generate(**prompt, **kwargs))
