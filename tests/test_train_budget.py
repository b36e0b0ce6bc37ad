"""train.memory_budget (train/budget.py): the fastest activation setting whose planned peak fits. On the full
Qwen-VL shape (meta device): fewer decoder layers recomputed as the budget grows, the planned peak within the
budget every time, a value the recipe sets kept, one log line saying what was chosen; off on a CPU."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from models import build_vlm, presets
from train.budget import PLAN_ERROR, BudgetChoice, Settings, choose, extra_seconds, without_budget
from train.flops import recompute_flops
from train.loop import settle_memory_budget
from train.memory import Counts, Dims, GiB, MicroBatch, Setup, estimate
from train.parallel import DistInfo
from train.plan import budget_for_device, make_plan, needed_bytes, plan_model, settle_budget
from train.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[1]
FULL_SHAPE = ["model.init_from=null", "model.preset=qwen_vl_7b", "model.pad_vocab_to=151936"]


def sft_lora(*overrides: str):
    return load_recipe(REPO / "recipes/sft_lora.yaml", [*FULL_SHAPE, *overrides])


@pytest.fixture(scope="module")
def qwen_vl():
    """The shipped LoRA recipe's model at the full Qwen-VL shape, counted on the meta device (once)."""
    return plan_model(sft_lora())


def choice_for(qwen_vl, *overrides: str, gpu_mem_gib: float = 80.0) -> BudgetChoice:
    return settle_budget(sft_lora(*overrides), qwen_vl, 1, gpu_mem_gib, "sft_lora.yaml")[1]


def test_the_shipped_recipes_leave_the_activation_settings_to_the_budget():
    for name in ("sft_lora", "sft_qlora", "dpo_lora", "sft", "dpo"):
        recipe = load_recipe(REPO / f"recipes/{name}.yaml", FULL_SHAPE)
        assert recipe.train.memory_budget == "auto", name
        assert (
            recipe.perf.checkpoint_llm_layers,
            recipe.perf.offload_activations,
            recipe.perf.checkpoint_vision,
            recipe.train.max_forward_tokens,
        ) == ("auto",) * 4, name


def test_more_budget_fewer_checkpointed_layers_and_the_planned_peak_within_the_budget(qwen_vl):
    choices = {gib: choice_for(qwen_vl, f"train.memory_budget={gib}") for gib in (24, 40, 80)}
    for gib, choice in choices.items():
        print(choice.line)
        assert choice.fits and choice.planned_peak_gib <= gib, choice.line
    layers = [choices[gib].settings.checkpointed_layers for gib in (24, 40, 80)]
    assert layers[0] > layers[1] > layers[2], layers
    # 24 GiB: today's shipped setting, every layer checkpointed with its input parked on the host
    assert choices[24].settings == Settings(32, True, True, 8192)
    # 80 GiB: nothing recomputed, nothing parked
    assert choices[80].settings.checkpointed_layers == 0 and not choices[80].settings.offload
    assert choices[24].extra_seconds > choices[40].extra_seconds > choices[80].extra_seconds


def test_the_planned_peak_is_the_planners_for_the_chosen_settings(qwen_vl):
    choice = choice_for(qwen_vl, "train.memory_budget=40")
    s = choice.settings
    fixed = sft_lora(
        "train.memory_budget=null",
        f"perf.checkpoint_llm_layers={s.checkpointed_layers}",
        f"perf.offload_activations={str(s.offload).lower()}",
        f"perf.checkpoint_vision={str(s.checkpoint_vision).lower()}",
        f"train.max_forward_tokens={s.max_forward_tokens}",
    )
    images = 2048 / (qwen_vl.config.num_image_tokens + 2)  # the choice plans every token an image slot
    plan = make_plan(fixed, "r", images_per_sample=images, model=qwen_vl)
    assert plan.estimate.process_peak / GiB == pytest.approx(choice.planned_peak_gib)
    # one more layer un-checkpointed would not have fitted
    tighter = dataclasses.replace(plan.setup, checkpointed_layers=s.checkpointed_layers - 1)
    assert estimate(qwen_vl.counts, qwen_vl.shape.dims, tighter, plan.batch).process_peak > 40 * GiB


def test_auto_is_the_gpu_memory_less_the_planners_allowance(qwen_vl):
    choice = choice_for(qwen_vl, gpu_mem_gib=80.0)
    assert choice.how.startswith("auto: 80.0 GiB less the CUDA context and allocator slack")
    plan = make_plan(sft_lora(), "r", gpu_mem_gib=80.0, model=qwen_vl)
    assert plan.budget == choice and plan.fits
    assert needed_bytes(plan.estimate, plan.setup) <= 80 * GiB
    assert choice.budget_gib * GiB == pytest.approx(budget_for_device(80.0, plan.setup))
    assert (choice.budget_gib * 1.1 + 1) == pytest.approx(80.0)  # 10% allocator slack + 1 GiB of context


def test_a_value_the_recipe_sets_wins_and_the_line_says_so(qwen_vl):
    choice = choice_for(qwen_vl, "train.memory_budget=80", "perf.checkpoint_llm_layers=8")
    assert choice.settings.checkpointed_layers == 8 and choice.fixed == ("checkpointed_layers",)
    assert choice.checkpointed_indices == [0, 4, 8, 12, 16, 20, 24, 28]
    assert (
        "8 of 32 decoder layers checkpointed (layers 0, 4, 8, 12, 16, 20, 24, 28) (set), no offload,"
        in choice.line
    )
    forced = choice_for(qwen_vl, "train.memory_budget=80", "train.max_forward_tokens=16384")
    assert forced.settings.max_forward_tokens == 16384 and "forwards of 16384 tokens (set)" in forced.line
    # and the trainer's recipe carries the value
    recipe, _ = settle_budget(
        sft_lora("train.memory_budget=80", "perf.checkpoint_llm_layers=8"), qwen_vl, 1, 80, "r"
    )
    assert recipe.perf.checkpoint_llm_layers == 8 and recipe.train.max_forward_tokens == 8192


def test_the_line(qwen_vl):
    line = choice_for(qwen_vl, "train.memory_budget=80").line
    assert re.fullmatch(
        r"memory budget 80\.0 GiB \(train\.memory_budget\): 0 of 32 decoder layers checkpointed, "
        r"no offload, resampler (not )?checkpointed, forwards of 8192 tokens; "
        r"planned peak \d\d\.\d GiB",
        line,
    ), line
    tight = choice_for(qwen_vl, "train.memory_budget=40").line
    assert re.search(
        r": \d\d of 32 decoder layers checkpointed \((all but|layers) [\d, ]+\), no offload", tight
    )
    over = choice_for(qwen_vl, "train.memory_budget=16")
    assert not over.fits and over.settings == Settings(32, True, True, 8192)
    assert over.line.endswith("> the budget: no setting fits, this is the one that needs least")


def test_without_activation_checkpointing_only_the_forward_size_is_chosen(qwen_vl):
    choice = choice_for(qwen_vl, "train.memory_budget=40", "train.grad_checkpointing=false")
    assert choice.extra_seconds == 0 and not choice.settings.offload
    assert "no activation checkpointing (train.grad_checkpointing: false), forwards of" in choice.line


def test_without_a_budget_auto_settings_are_the_plain_ones():
    recipe = without_budget(sft_lora("train.memory_budget=null"))
    assert (
        recipe.perf.checkpoint_llm_layers,
        recipe.perf.offload_activations,
        recipe.perf.checkpoint_vision,
        recipe.train.max_forward_tokens,
    ) == (None, False, True, 8192)  # one packed row per forward
    full = without_budget(load_recipe(REPO / "recipes/sft.yaml", FULL_SHAPE))
    assert full.train.max_forward_tokens is None  # no pack_len: one forward per micro-batch


def test_on_a_cpu_the_trainer_turns_the_budget_off_in_one_line(capsys):
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    recipe, choice = settle_memory_budget(sft_lora(), cpu)
    out = capsys.readouterr().out
    assert (
        choice is None
        and out.count("\n") == 1
        and out.startswith("train.memory_budget: off (no CUDA device)")
    )
    assert recipe.train.memory_budget is None and recipe.perf.checkpoint_llm_layers is None
    assert recipe.perf.offload_activations is False and recipe.train.max_forward_tokens == 8192


def test_a_peak_beyond_the_planners_error_is_one_warning_with_both_figures(qwen_vl):
    choice = choice_for(qwen_vl, "train.memory_budget=40")
    assert choice.peak_warning(choice.planned_peak_gib * (1 + PLAN_ERROR) - 0.01) is None
    warning = choice.peak_warning(choice.planned_peak_gib * 1.2)
    assert warning.startswith("warning: peak memory") and warning.count("\n") == 0
    assert (
        f"{choice.planned_peak_gib * 1.2:.1f} GiB" in warning
        and f"{choice.planned_peak_gib:.1f} GiB" in warning
    )


def test_memory_budget_must_be_positive_or_auto():
    assert sft_lora("train.memory_budget=24").train.memory_budget == 24.0
    with pytest.raises(RecipeError, match="train.memory_budget' must be a positive number of GiB or auto"):
        sft_lora("train.memory_budget=0")
    with pytest.raises(RecipeError, match="train.memory_budget"):
        sft_lora("train.memory_budget=lots")


# ------------------------------------------------------------------------------------------ the cost model
QWEN = Dims(
    hidden=4096,
    kv_dim=4096,
    ffn=11008,
    layers=32,
    heads=32,
    vocab=151936,
    vit_width=1664,
    vit_mlp=8192,
    vit_layers=48,
    patches=1024,
    queries=256,
)
COUNTS = Counts(
    total=9_876_652_800,
    trainable=220_766_208,
    lora=128_974_848,
    largest_group=128_974_848,
    layer_linears=202_375_168,
)
LORA = Setup(
    mode="single",
    frozen_bf16=True,
    llm_trains=False,
    head_trains=False,
    lora_inputs=(4096,) * 6,
    lora_r=64,
    lora_dropout=0.05,
    checkpointed_layers=32,
    liger_kernels=True,
)
ROW = MicroBatch(samples=4, rows=1, row_len=8192, images=4, real_tokens=8192)


def test_the_cost_is_the_recompute_and_the_offload():
    rates = recompute_flops(presets.qwen_vl_7b(vocab_size=151936))
    cost = {
        k: extra_seconds(Settings(k, False, True, 8192), LORA, QWEN, COUNTS, rates, ROW, 2048)
        for k in (0, 1, 32)
    }
    # a 7B layer's recompute at 8192 tokens: q, k, v, o, gate and up (the down projection runs outside the
    # checkpoint), the adapters' forward and causal attention over 4 samples of 2048 tokens
    linears = 2 * (4 * 4096 * 4096 + 2 * 4096 * 11008) + 2 * COUNTS.lora / 32
    per_layer = cost[1] - cost[0]
    assert per_layer == pytest.approx((8192 * linears + 4 * 2048**2 * 2 * 4096) / 640e12)  # ~4.3 ms
    trains_down = dataclasses.replace(
        LORA, lora_inputs=(4096,) * 6 + (11008,)
    )  # adapted: recomputed in the checkpoint
    down = extra_seconds(
        Settings(1, False, True, 8192), trains_down, QWEN, COUNTS, rates, ROW, 2048
    ) - extra_seconds(Settings(0, False, True, 8192), trains_down, QWEN, COUNTS, rates, ROW, 2048)
    assert down - per_layer == pytest.approx(8192 * 2 * 4096 * 11008 / 640e12)
    assert cost[32] - cost[0] == pytest.approx(32 * per_layer)
    parked = extra_seconds(Settings(32, True, True, 8192), LORA, QWEN, COUNTS, rates, ROW, 2048) - cost[32]
    assert parked == pytest.approx(
        32 * 8192 * 4096 * 2 / GiB * 0.005
    )  # bf16 layer inputs (frozen bf16 embeddings)
    assert cost[0] > 0  # the resampler's recompute (it trains)
    no_resampler = extra_seconds(Settings(0, False, False, 8192), LORA, QWEN, COUNTS, rates, ROW, 2048)
    assert no_resampler == 0


def test_offload_is_only_chosen_with_every_layer_checkpointed_and_only_when_needed():
    rates = recompute_flops(presets.qwen_vl_7b(vocab_size=151936))

    def pick(budget_gib: float) -> BudgetChoice:
        return choose(COUNTS, QWEN, LORA, lambda mft: ROW, [8192], budget_gib * GiB, "test", rates, 2048)

    roomy, tight = (
        pick(200),
        pick(
            estimate(COUNTS, QWEN, dataclasses.replace(LORA, offload_activations=True), ROW).process_peak
            / GiB
        ),
    )
    assert roomy.settings == Settings(0, False, False, 8192)
    assert tight.settings.offload and tight.settings.checkpointed_layers == 32


def test_vision_false_leaves_the_vision_tower_and_resampler_uncheckpointed(tiny_tokenizer):
    vlm = build_vlm(presets.tiny(vocab_size=len(tiny_tokenizer)), tokenizer=tiny_tokenizer)
    vlm.set_gradient_checkpointing(True, vision=False)
    assert not vlm.resampler_checkpointing and not vlm.vision.gradient_checkpointing
    vlm.set_gradient_checkpointing(True)
    assert vlm.resampler_checkpointing and vlm.vision.gradient_checkpointing
