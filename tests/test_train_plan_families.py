"""train.plan and train.memory_budget for the Hugging Face families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): the
planner reads each family's own shapes (its decoder with grouped-query attention, its ViT per patch of the
largest image data.max_pixels admits, Qwen2.5-VL's window attention, the 2x2 patch mergers), counts the
parameters the trainer builds, and the budget chooses for the shipped family recipes as for Qwen-VL's."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from models.families.adapter import HFFamilyModel
from train.assemble import FAMILIES, assemble
from train.budget import Settings
from train.cli import main as vlrecipe
from train.flops import vit_forward_flops
from train.memory import GiB, estimate
from train.plan import make_plan, plan_model, settle_budget
from train.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
FAMILY_RECIPES = [
    f"recipes/{family}/{stage}.yaml"
    for family in ("qwen2_5_vl", "qwen3_vl")
    for stage in ("sft", "sft_lora", "sft_qlora")
]


def full_shape(tiktoken: Path) -> list[str]:
    return ["model.init_from=null", "model.preset=qwen2_5_vl_7b", f"model.tokenizer_path={tiktoken}"]


def qwen2_5_vl_lora(tiktoken: Path, *overrides: str):
    return load_recipe(REPO / "recipes/qwen2_5_vl/sft_lora.yaml", [*full_shape(tiktoken), *overrides])


@pytest.fixture(scope="module")
def qwen2_5_vl(released_qwen_tiktoken):
    """The shipped Qwen2.5-VL LoRA recipe's model at the released 7B shape, counted on the meta device."""
    return plan_model(qwen2_5_vl_lora(released_qwen_tiktoken))


# ------------------------------------------------------------------------------------------ shapes
def data_section(**fields):
    return load_recipe(
        REPO / "recipes/qwen2_5_vl/sft.yaml", [f"data.{k}={v}" for k, v in fields.items()]
    ).data


@pytest.mark.parametrize(
    "preset, width, mlp, mlp_linears, mergers, tokens",
    [
        # Qwen2-VL: the vision config's hidden_size (3584) is the LLM's; the ViT is embed_dim 1280 wide
        ("qwen2_vl_7b", 1280, 5120, 2, 1, 1280),
        ("qwen2_5_vl_7b", 1280, 3420, 3, 1, 1280),  # SwiGLU MLP
        ("qwen3_vl_8b", 1152, 4304, 2, 4, 1280),  # 3 DeepStack mergers; 32 px per token: 1310720 / 32^2
    ],
)
def test_each_family_gives_its_own_shapes(preset, width, mlp, mlp_linears, mergers, tokens):
    model = HFFamilyModel.from_preset(preset, device="meta")
    family = FAMILIES[model.spec.name]
    max_pixels = 1003520 if model.spec.patch_size == 14 else 1310720  # 1,280 tokens of 28 / 32 px
    shape = family.plan_shape(model, data_section(max_pixels=max_pixels))
    d, text = shape.dims, model.config.text_config
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    assert (d.hidden, d.ffn, d.layers, d.heads, d.vocab) == (
        text.hidden_size,
        text.intermediate_size,
        text.num_hidden_layers,
        heads,
        text.vocab_size,
    )
    assert d.kv_dim == kv_heads * head_dim < heads * head_dim  # grouped-query attention
    assert (d.vit_width, d.vit_mlp, d.vit_layers) == (width, mlp, model.config.vision_config.depth)
    assert (d.queries, d.patches, d.mergers) == (tokens, 4 * tokens, mergers)  # 2x2 patches per token
    assert f"{tokens:,} tokens" in shape.image and not shape.liger_kernels
    if preset == "qwen2_5_vl_7b":
        # window attention: 28 of its 32 blocks attend within windows of 112 px (8 x 8 = 64 patches)
        p = d.patches
        every_block_full = vit_forward_flops(p, width, mlp, mlp_linears, 3 * 2 * 14 * 14, [p] * 32)
        assert shape.flops.vision == every_block_full - 28 * 4 * p * (p - 64) * width


def test_an_image_takes_at_most_what_max_pixels_and_a_sample_admit():
    model = HFFamilyModel.from_preset("qwen2_5_vl_tiny", device="meta")
    shape = FAMILIES["qwen2_5_vl"].plan_shape
    assert shape(model, data_section(max_pixels=28 * 28 * 100)).dims.queries == 100
    # no data.max_pixels: the released processor's 12,845,056 (16,384 tokens), cut to one sample of max_len
    assert shape(model, data_section(max_pixels="null", max_len=4096)).dims.queries == 4094


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_the_planned_counts_are_the_trainers(family, tiny_tiktoken):
    """The tiny preset with LoRA and a trained merger (Qwen3-VL: its DeepStack mergers too), built by the
    trainer's own assemble on the CPU, against the planner's meta-device counts."""
    recipe = load_recipe(
        REPO / "recipes/tiny/qwen2_5_vl_sft_lora.yaml",
        [
            f"model.family={family}",
            f"model.preset={family}_tiny",
            f"model.tokenizer_path={tiny_tiktoken}",
            "data.paths=[x.json]",
        ],
    )
    planned = plan_model(recipe).counts
    real = assemble(recipe, "cpu").model
    assert planned.total == sum(p.numel() for p in real.parameters())
    assert planned.trainable == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert planned.lora == sum(p.numel() for n, p in real.named_parameters() if "lora_" in n) > 0
    mergers = [n for n, p in real.named_parameters() if p.requires_grad and "merger" in n]
    assert mergers and (family != "qwen3_vl" or any("deepstack_merger_list" in n for n in mergers))


@pytest.mark.parametrize("stage", ["qwen2_5_vl_sft.yaml", "qwen2_5_vl_sft_lora.yaml"])
def test_a_frozen_vit_records_no_graph_as_planned(stage, tiny_tiktoken):
    """The plan counts nothing kept by a frozen ViT. With activation checkpointing on (every shipped recipe),
    transformers would make every sub-model's input embeddings require grad, the ViT's patch embedding too:
    the frozen tower would then record its graph and run its backward. Its output must not require grad, the
    trained merger's must, and the decoder's trainable weights (LoRA adapters behind frozen embeddings, or
    the whole LLM) still get their gradients through the checkpointed layers."""
    recipe = load_recipe(
        REPO / "recipes/tiny" / stage,
        [
            "model.preset=qwen2_5_vl_tiny",
            f"model.tokenizer_path={tiny_tiktoken}",
            "data.paths=[x.json]",
            "train.grad_checkpointing=true",
        ],
    )
    vlm = assemble(recipe, "cpu").vlm
    vision = vlm.hf.model.visual(torch.randn(16, 3 * 2 * 14 * 14), grid_thw=torch.tensor([[1, 4, 4]]))
    assert not vision.last_hidden_state.requires_grad and vision.pooler_output.requires_grad
    hidden = vlm.hf.model.language_model(input_ids=torch.tensor([[1, 2, 3, 4]]), use_cache=False)
    hidden.last_hidden_state.float().square().mean().backward()
    trained = [p for n, p in vlm.named_parameters() if p.requires_grad and ".language_model." in f".{n}"]
    assert trained and all(p.grad is not None for p in trained)


# ------------------------------------------------------------------------------------------ the budget
def test_the_shipped_family_recipes_leave_the_activation_settings_to_the_budget(released_qwen_tiktoken):
    for name in FAMILY_RECIPES:
        recipe = load_recipe(REPO / name, [f"model.tokenizer_path={released_qwen_tiktoken}"])
        assert recipe.train.memory_budget == "auto", name
        assert (
            recipe.perf.checkpoint_llm_layers,
            recipe.perf.offload_activations,
            recipe.perf.checkpoint_vision,
            recipe.train.max_forward_tokens,
        ) == ("auto",) * 4, name


def test_qwen2_5_vl_lora_at_80_40_and_24_gib(qwen2_5_vl, released_qwen_tiktoken):
    def choice(gib: int):
        recipe = qwen2_5_vl_lora(released_qwen_tiktoken, f"train.memory_budget={gib}")
        return settle_budget(recipe, qwen2_5_vl, 1, 80.0, "sft_lora.yaml")[1]

    choices = {gib: choice(gib) for gib in (80, 40, 24)}
    for gib, c in choices.items():
        print(c.line)
        assert c.fits and c.planned_peak_gib <= gib and c.layers == 28, c.line
        # the ViT is frozen and the merger is never checkpointed: nothing for perf.checkpoint_vision to choose
        assert "resampler" not in c.line and "vision tower" not in c.line
    layers = [choices[gib].settings.checkpointed_layers for gib in (80, 40, 24)]
    assert layers[0] < layers[1] < layers[2] == 28, layers
    assert not choices[80].settings.offload and not choices[40].settings.offload
    # 24 GiB: every layer checkpointed (the compiled layers keep too little to need host copies), forwards of
    # one packed row
    assert choices[24].settings == Settings(28, False, True, 8192)
    assert choices[80].extra_seconds < choices[40].extra_seconds < choices[24].extra_seconds


def test_the_planned_peak_is_the_planners_for_the_chosen_settings(qwen2_5_vl, released_qwen_tiktoken):
    choice = settle_budget(
        qwen2_5_vl_lora(released_qwen_tiktoken, "train.memory_budget=40"), qwen2_5_vl, 1, 80.0, "r"
    )[1]
    s = choice.settings
    fixed = qwen2_5_vl_lora(
        released_qwen_tiktoken,
        "train.memory_budget=null",
        f"perf.checkpoint_llm_layers={s.checkpointed_layers}",
        f"perf.offload_activations={str(s.offload).lower()}",
        f"train.max_forward_tokens={s.max_forward_tokens}",
    )
    images = 4096 / (1280 + 2)  # the choice plans every token an image slot, each image at data.max_pixels
    plan = make_plan(fixed, "r", images_per_sample=images, model=qwen2_5_vl)
    assert plan.estimate.process_peak / GiB == pytest.approx(choice.planned_peak_gib)
    tighter = dataclasses.replace(plan.setup, checkpointed_layers=s.checkpointed_layers - 1)
    assert estimate(qwen2_5_vl.counts, qwen2_5_vl.shape.dims, tighter, plan.batch).process_peak > 40 * GiB


def test_a_plan_says_when_its_samples_cannot_hold_the_images_it_plans(qwen2_5_vl, released_qwen_tiktoken):
    recipe = qwen2_5_vl_lora(released_qwen_tiktoken)  # images planned at data.max_pixels: 1,280 tokens

    def warned(tokens: int, images: float) -> bool:
        plan = make_plan(recipe, "r", tokens_per_sample=tokens, images_per_sample=images, model=qwen2_5_vl)
        return any("cannot hold" in note for note in plan.notes)

    assert warned(200, 1.0) and warned(2000, 2.0)
    assert not warned(1282, 1.0) and not warned(4096, 3.0) and not warned(200, 0.0)


def test_a_trained_vit_is_checkpointed_by_the_budget_but_never_the_merger(qwen2_5_vl, released_qwen_tiktoken):
    plan = make_plan(
        qwen2_5_vl_lora(released_qwen_tiktoken, "train.memory_budget=null"), "r", model=qwen2_5_vl
    )
    merger_only = plan.setup  # frozen ViT, trained merger: checkpoint_vision changes nothing
    for vision in (True, False):
        trial = dataclasses.replace(merger_only, vision_checkpointing=vision)
        assert (
            estimate(qwen2_5_vl.counts, qwen2_5_vl.shape.dims, trial, plan.batch).terms[
                "activations: vision + resampler"
            ]
            == plan.estimate.terms["activations: vision + resampler"]
        )
    vit_trains = qwen2_5_vl_lora(released_qwen_tiktoken, "freeze.vision=train", "train.memory_budget=40")
    choice = settle_budget(vit_trains, plan_model(vit_trains), 1, 80.0, "r")[1]
    assert re.search(r", vision tower (not )?checkpointed, ", choice.line) and "resampler" not in choice.line


# ------------------------------------------------------------------------------------------ the command
def test_vlrecipe_plan_prints_a_family_plan(released_qwen_tiktoken, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    vlrecipe(
        [
            "plan",
            "recipes/qwen2_5_vl/sft_lora.yaml",
            *full_shape(released_qwen_tiktoken),
            "--gpus",
            "1",
            "--gpu-mem",
            "80",
        ]
    )
    out = capsys.readouterr().out
    assert out.startswith("plan of recipes/qwen2_5_vl/sft_lora.yaml (per GPU)")
    assert "images at up to 1,003,520 pixels (1,280 tokens, 5,120 patches; data.max_pixels)" in out
    assert re.search(
        r"memory budget \d\d\.\d GiB \(auto: 80\.0 GiB less the CUDA context and allocator slack\): "
        r"\d+ of 28 decoder layers checkpointed",
        out,
    )
    assert re.search(r"needed / --gpu-mem +\d\d\.\d / 80  fits", out)
