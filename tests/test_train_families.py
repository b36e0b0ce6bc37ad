"""A Hugging Face family (Qwen2.5-VL) trains from a recipe: `model.family: qwen2_5_vl`, the tiny preset, the
synthetic world's chat data encoded in the family's own tokens. The loss falls; the export is an HF directory
that transformers' AutoModelForImageTextToText and models.load_pretrained both load, holding what trained and
nothing else; LoRA from that export (packed rows) exports an adapter and a merged model; a run stopped and
resumed equals an uninterrupted one; Qwen2-VL and Qwen3-VL train from the same recipe. Also: the data check
counts each image's own tokens, and ZeRO-3 on 2 processes survives steps mixing text-only and image samples.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import write_tiny_tiktoken
from tests.test_train_world import TINY, make_world, read_losses, run_train

RECIPE = TINY / "qwen2_5_vl_sft.yaml"
TIKTOKEN = "qwen.tiktoken"  # in the world folder


def overrides(world: Path, run: Path) -> list[str]:
    return [
        f"model.tokenizer_path={world / TIKTOKEN}",
        f"data.paths=[{world / 'chat.json'}]",
        f"checkpoint.out_dir={run}",
        "train.steps=6",
        "checkpoint.every=3",  # step 3 is mid-epoch: 8 records, 4 per step
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The synthetic world, and a tiny qwen.tiktoken the family's tokenizer is built from (conftest): the
    model's embeddings have one row per token of it, so the runs take seconds."""
    world = make_world(tmp_path_factory.mktemp("world"))
    write_tiny_tiktoken(world / TIKTOKEN)
    return world


@pytest.fixture(scope="module")
def full_run(world, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("full")
    run_train([str(RECIPE), *overrides(world, run)])
    return run


def initial_model(world: Path):
    """The model the trainer starts from: the preset for the world's tokenizer, drawn after seeding with
    train.seed (0)."""
    from models.families.adapter import HFFamilyModel
    from models.families.processor import build_family_tokenizer
    from models.families.specs import QWEN2_5_VL

    tokenizer = build_family_tokenizer(QWEN2_5_VL, world / TIKTOKEN)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return HFFamilyModel.from_preset("qwen2_5_vl_tiny", tokenizer=tokenizer)


def test_the_loss_falls(full_run):
    losses = read_losses(full_run)
    assert sorted(losses) == list(range(1, 7))
    assert losses[6] < losses[1] - 0.5, losses


def test_the_export_is_an_hf_directory_holding_what_trained(full_run, world):
    from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from models import load_pretrained
    from models.families.adapter import HFFamilyModel

    export = full_run / "final"
    assert (export / "manifest.json").is_file() and (export / "training_info.json").is_file()
    hf = AutoModelForImageTextToText.from_pretrained(export)
    assert isinstance(hf, Qwen2_5_VLForConditionalGeneration)
    processor = AutoProcessor.from_pretrained(export)
    assert (
        processor.image_processor.size["shortest_edge"],
        processor.image_processor.size["longest_edge"],
    ) == (
        3136,
        12544,
    )  # the recipe's data.min_pixels / data.max_pixels
    model, loaded_processor = load_pretrained(export)
    assert isinstance(model, HFFamilyModel) and type(loaded_processor) is type(processor)
    exported = {name: p for name, p in model.hf.named_parameters()}
    for name, p in hf.named_parameters():
        torch.testing.assert_close(p, exported[name], rtol=0, atol=0, msg=name)

    # freeze: vision frozen, merger (resampler) and LLM train
    start = dict(initial_model(world).hf.named_parameters())
    changed = {name for name, p in exported.items() if not torch.equal(p, start[name])}
    assert {
        name for name in exported if name.startswith("model.visual.") and ".merger." not in name
    }.isdisjoint(changed)
    assert any(".merger." in name for name in changed)
    assert "lm_head.weight" in changed and "model.language_model.embed_tokens.weight" in changed


def test_lora_from_the_export_on_packed_rows_exports_adapter_and_merged_model(full_run, world, tmp_path):
    from transformers import AutoModelForImageTextToText

    from models import load_pretrained

    run = tmp_path / "lora"
    run_train(
        [
            str(TINY / "qwen2_5_vl_sft_lora.yaml"),
            *overrides(world, run),
            f"model.init_from={full_run / 'final'}",
            "train.steps=4",
            "checkpoint.every=0",
            "data.packing=true",
            "lora.merge_on_export=true",
        ]
    )
    losses = read_losses(run)
    assert losses[4] < losses[1], losses
    adapter, merged = run / "final" / "adapter", run / "final" / "merged"
    assert (adapter / "adapter_model.safetensors").is_file()
    from_adapter, _ = load_pretrained(adapter)  # its base: training_info's init_from, the full export
    hf = AutoModelForImageTextToText.from_pretrained(merged)
    base, _ = load_pretrained(full_run / "final")
    merged_params = dict(hf.named_parameters())
    base_params = dict(base.hf.named_parameters())
    for name, p in from_adapter.hf.named_parameters():
        torch.testing.assert_close(p, merged_params[name], msg=name)
    changed = {name for name, p in merged_params.items() if not torch.equal(p, base_params[name])}
    # adapters on the LLM's linears (merged in) and the merger; embeddings, head and ViT untouched
    assert any(".language_model.layers." in n and n.endswith("q_proj.weight") for n in changed), changed
    assert any(".merger." in n for n in changed)
    assert not any(
        n.startswith("model.visual.blocks.") or "embed_tokens" in n or "lm_head" in n for n in changed
    )


def test_a_stopped_and_resumed_run_equals_an_uninterrupted_one(full_run, world, tmp_path):
    run = tmp_path / "resumed"
    run_train([str(RECIPE), *overrides(world, run), "train.stop_after_steps=3"])
    assert not (run / "final").exists()
    run_train([str(RECIPE), *overrides(world, run), "train.resume=auto"])
    assert read_losses(run) == read_losses(full_run)
    from safetensors.torch import load_file

    straight = load_file(full_run / "final" / "model.safetensors")
    resumed = load_file(run / "final" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.preset=qwen3_vl_tiny", "is a qwen3_vl preset but 'model.family' is qwen2_5_vl"),
        ("model.llm_path=/x", "'model.llm_path' is the Qwen-VL model's"),
        ("train.stage=pretrain", "trains 'train.stage: sft'"),
        ("optim.vit_layer_decay=0.9", "'optim.vit_layer_decay' is not supported"),
        ("perf.attention=flex_attention", "'perf.attention: flex_attention' is not available"),
    ],
)
def test_a_family_recipe_refuses_what_the_family_does_not_train(override, message):
    from train.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(RECIPE, ["data.paths=[x.json]", override])


def test_the_data_check_counts_each_images_own_tokens_as_the_processor_does(world, tmp_path):
    """Two records, one with a small image and one with a small and a large one: the check's token total is
    what the family's own processor gives the same conversations (each image its own grid within the
    recipe's pixel budget), and the report says images have no fixed count."""
    from PIL import Image

    from models.families.processor import build_family_processor
    from models.families.specs import QWEN2_5_VL
    from train.data_check import recipe_image_tokens, recipe_sample_builder, recipe_tokenizer
    from train.recipe import load_recipe

    sizes = {"small.png": (96, 80), "large.png": (200, 150)}
    for name, size in sizes.items():
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / name)
    conversations = [
        ["small.png"],
        ["small.png", "large.png"],
    ]
    records = [
        {
            "conversations": [
                {"from": "user", "value": "".join(f"<img>{tmp_path / n}</img>" for n in names) + "Colour?"},
                {"from": "assistant", "value": "Red."},
            ]
        }
        for names in conversations
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    recipe = load_recipe(
        RECIPE, [f"model.tokenizer_path={world / TIKTOKEN}", f"data.paths=[{tmp_path / 'data.json'}]"]
    )
    tokenizer, image_tokens = recipe_tokenizer(recipe.model), recipe_image_tokens(recipe.model)
    assert image_tokens is None
    report = check_data_report(recipe, tokenizer, recipe_sample_builder(recipe, tokenizer, image_tokens))

    processor = build_family_processor(QWEN2_5_VL, world / TIKTOKEN, min_pixels=3136, max_pixels=12544)
    expected = 0
    for names in conversations:
        messages = [
            {
                "role": "user",
                "content": [*({"type": "image"} for _ in names), {"type": "text", "text": "Colour?"}],
            },
            {"role": "assistant", "content": "Red."},
        ]
        text = processor.apply_chat_template(messages, tokenize=False)
        images = [Image.open(tmp_path / n) for n in names]
        expected += processor(text=[text], images=images, return_tensors="pt")["input_ids"].shape[1]
    assert report["tokens"]["before_truncation"]["total"] == expected
    assert "each image its own grid's tokens" in report["text"]


def check_data_report(recipe, tokenizer, builder) -> dict:
    from data.check import CheckOptions, check_data

    options = CheckOptions(progress=False, workers=1)
    report = check_data(recipe.data, tokenizer, None, options, builder)
    return {**report.report, "text": report.text()}


def train_on_two_ranks(world: Path, folder: Path, records: list[dict], *settings: str) -> Path:
    """The tiny family recipe on ``records`` (written to FOLDER/records.json, read in order) under torchrun
    with 2 processes; returns the run directory."""
    (folder / "records.json").write_text(json.dumps(records))
    run = folder / "run"
    run_train(
        [
            str(RECIPE),
            f"model.tokenizer_path={world / TIKTOKEN}",
            f"data.paths=[{folder / 'records.json'}]",
            f"checkpoint.out_dir={run}",
            "data.shuffle=false",
            *settings,
        ],
        nproc=2,
        timeout=240,
    )
    return run


@pytest.mark.slow
def test_zero3_on_two_processes_with_text_only_and_image_samples_in_one_step(world, tmp_path):
    """One sample per rank and step, in order: records I T T I T I I T (image / text only) put an image
    sample on one rank and a text-only one on the other at some step, whichever way the sampler splits
    them. The text-only rank runs the ViT on a blank image at the same point of its forward, so ZeRO-3's
    parameter gathers match on both ranks: the run finishes (a mismatch aborts the collective or hangs until
    the timeout) and exports whole weights."""
    from models import load_pretrained

    image, text = (
        lambda i: [
            {
                "from": "user",
                "value": f"<img>{world / 'images' / f'{i}.png'}</img>\nWhat color is the picture?",
            },
            {"from": "assistant", "value": "A colour."},
        ],
        [{"from": "user", "value": "Say something."}, {"from": "assistant", "value": "Something."}],
    )
    records = [{"conversations": image(i) if kind == "I" else text} for i, kind in enumerate("ITTITIIT")]
    run = train_on_two_ranks(
        world, tmp_path, records, "parallel.mode=zero3", "train.micro_batch=1", "train.steps=4"
    )
    assert all(np.isfinite(v) for v in read_losses(run).values()) and len(read_losses(run)) == 4
    model, _ = load_pretrained(run / "final")  # gathered from the shards
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_token_bounded_micro_batches_keep_two_ranks_in_step_when_they_form_different_numbers(world, tmp_path):
    """train.micro_batch_tokens with train.epochs under DDP on 2 processes. In order, rank 0 takes the
    records with an image (153 tokens each) and rank 1 the short text-only ones (65): under a bound of 200
    tokens rank 0 forms 6 micro-batches of one sample, rank 1 two of three. Both ranks run the fewer (one
    epoch = 2 steps); a rank planning its own 6 would wait for the other in its third step's all-reduce."""
    image = [
        {"from": "user", "value": "<img>{}</img>\nWhat color is the picture? Describe it in detail."},
        {"from": "assistant", "value": "A colour, and a long answer about it."},
    ]
    text = [{"from": "user", "value": "Hi."}, {"from": "assistant", "value": "Hi."}]
    records = []
    for i in range(12):
        path = world / "images" / f"{i % 8}.png"
        turns = [{**image[0], "value": image[0]["value"].format(path)}, image[1]] if i % 2 == 0 else text
        records.append({"conversations": turns})
    run = train_on_two_ranks(
        world,
        tmp_path,
        records,
        "parallel.mode=ddp",
        "data.packing=true",
        "train.micro_batch=4",
        "train.micro_batch_tokens=200",
        "train.steps=null",
        "train.epochs=1",
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["tokens"] for r in rows] == [153 + 3 * 65] * 2  # rank 0's one sample, rank 1's three
    assert (run / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "family, hf_class",
    [("qwen2_vl", "Qwen2VLForConditionalGeneration"), ("qwen3_vl", "Qwen3VLForConditionalGeneration")],
)
def test_the_other_families_train_from_the_same_recipe_on_packed_rows(family, hf_class, world, tmp_path):
    from transformers import AutoModelForImageTextToText

    run = tmp_path / family
    proc = run_train(
        [
            str(RECIPE),
            *overrides(world, run),
            f"model.family={family}",
            f"model.preset={family}_tiny",
            "train.steps=3",
            "checkpoint.every=0",
            "data.packing=true",
            # the family recipes' perf line (recipes/qwen2_5_vl/sft.yaml): on a CPU varlen becomes SDPA
            "perf.attention=varlen",
            "perf.loss_impl=auto",
            "perf.compile_llm=auto",
        ]
    )
    assert "perf.attention: varlen -> sdpa" in proc.stdout + proc.stderr
    losses = read_losses(run)
    assert losses[3] < losses[1], losses
    assert type(AutoModelForImageTextToText.from_pretrained(run / "final")).__name__ == hf_class
