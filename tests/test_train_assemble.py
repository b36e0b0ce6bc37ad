"""train.assemble: the trainer, the planner and the data check see one model.

The planner assembles the recipe on the meta device; the trainer assembles it with weights. Whatever the
recipe (frozen parts, LoRA on the LLM and the ViT, a previous stage's export), the two must have the same
parameter names, shapes and trainable set: the planner's counts are then the trainer's by construction.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from models.errors import UserError
from models.vlm import RuntimeOptions
from train.assemble import assemble
from train.data_check import recipe_image_tokens, recipe_tokenizer
from train.perf import runtime_options
from train.plan import plan_model
from train.recipe import load_recipe

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny"


def shapes(model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


@pytest.fixture
def tokenizer_dir(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


@pytest.fixture
def export_dir(tmp_path, tiny_vlm, tiny_tokenizer):
    model = copy.deepcopy(tiny_vlm)
    model.tokenizer = tiny_tokenizer
    model.save_pretrained(tmp_path / "export")
    return tmp_path / "export"


@pytest.mark.parametrize(
    "recipe_file, overrides",
    [
        ("pretrain.yaml", []),  # ViT frozen, resampler and LLM train
        ("sft.yaml", ["freeze.vision=train", "freeze.embeddings=frozen"]),
        ("sft_lora.yaml", []),  # LoRA on the LLM, the resampler saved in full
        ("sft_lora.yaml", ["lora.vision_targets=[attn.qkv, mlp.fc1]", "freeze.embeddings=train"]),
        ("sft_lora.yaml", ["model.pad_vocab_to=4096"]),
    ],
)
def test_the_planners_meta_model_is_the_trainers_model(tokenizer_dir, recipe_file, overrides):
    recipe = load_recipe(
        TINY / recipe_file, [f"model.tokenizer_path={tokenizer_dir}", "model.preset=tiny", *overrides]
    )
    trainer = assemble(recipe, "cpu")
    planner = assemble(recipe, "meta")
    assert shapes(planner.model) == shapes(trainer.model)
    assert planner.trainable == trainer.trainable and trainer.trainable
    assert planner.trains == trainer.trains
    assert planner.adapters == trainer.adapters
    assert all(p.is_meta for p in planner.model.parameters())
    assert not any(p.is_meta for p in trainer.model.parameters())
    # The planner's counts come from that model.
    counts = plan_model(recipe).counts
    assert counts.total == sum(p.numel() for p in trainer.model.parameters())
    assert counts.trainable == sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert counts.lora == sum(trainer.adapters.values())


def test_from_an_export_the_planner_reads_its_config_and_the_trainer_its_weights(
    tmp_path, tokenizer_dir, export_dir, tiny_vlm
):
    recipe = load_recipe(TINY / "sft_lora.yaml", [f"model.init_from={export_dir}", "model.preset=null"])
    trainer = assemble(recipe, "cpu")
    planner = assemble(recipe, "meta")
    assert shapes(planner.model) == shapes(trainer.model)
    assert planner.trainable == trainer.trainable
    assert torch.equal(trainer.vlm.resampler.proj, tiny_vlm.resampler.proj)
    # The data check tokenizes with the tokenizer the trainer trains with, and counts its image tokens.
    assert recipe_tokenizer(recipe.model).get_vocab() == trainer.tokenizer.get_vocab()
    assert recipe_image_tokens(recipe.model) == trainer.vlm.config.num_image_tokens


def test_a_mismatched_image_size_stops_trainer_and_planner_alike(tokenizer_dir):
    recipe = load_recipe(
        TINY / "pretrain.yaml", [f"model.tokenizer_path={tokenizer_dir}", "data.image_size=56"]
    )
    for device in ("cpu", "meta"):
        with pytest.raises(UserError, match="data.image_size=56 but the model's vision.image_size is 84"):
            assemble(recipe, device)


def test_the_perf_section_reaches_the_model_as_one_runtime_object(tokenizer_dir):
    """The trainer's model runs as its resolved perf section says: models.vlm.RuntimeOptions, set by the
    model's own set_runtime (on the CPU every "auto" kernel and compilation resolves to off)."""
    recipe = load_recipe(
        TINY / "pretrain.yaml",
        [f"model.tokenizer_path={tokenizer_dir}", "perf.loss_impl=chunked", "perf.check_image_spans=false"],
    )
    trainer = assemble(recipe, "cpu")
    assert trainer.vlm.runtime == RuntimeOptions(loss_impl="chunked", check_image_spans=False)
    assert trainer.vlm.runtime == runtime_options(trainer.perf)
    assert any(note.startswith("perf.liger_kernels: auto -> off (no CUDA device") for note in trainer.notes)
    assert assemble(recipe, "meta").vlm.runtime == RuntimeOptions()  # nothing runs on the meta device


def test_compiled_parts_stay_compiled_once_set(tiny_vlm):
    model = copy.deepcopy(tiny_vlm)
    model.set_runtime(RuntimeOptions(compile_vision=True))
    model.set_runtime(RuntimeOptions(loss_impl="chunked"))
    assert model.runtime == RuntimeOptions(loss_impl="chunked", compile_vision=True)


def test_liger_kernels_only_for_qwen2_decoders(tiny_vlm):
    model = copy.deepcopy(tiny_vlm)
    model.llm.config.model_type = "llama"
    with pytest.raises(UserError, match="perf.liger_kernels supports qwen2 decoders, not llama"):
        model.set_runtime(RuntimeOptions(liger_kernels=True))
