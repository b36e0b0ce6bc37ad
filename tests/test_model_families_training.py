"""A tiny family model trains on data.hf_encode batches: loss as the HF model computes it, gradients where the
freezing says, and packed rows (per-sample M-RoPE and attention) equal to samples run one by one, in fp32.
"""

from __future__ import annotations

import copy
import pickle

import peft
import pytest
import torch
from PIL import Image

from data.collate import Collator, split_rows
from data.hf_collate import collate_family_batch
from data.hf_encode import encode_record
from data.packing import supervised_positions
from models.families.adapter import HFFamilyModel
from models.families.processor import build_family_processor
from models.families.specs import FAMILIES
from train.freeze import apply_freezing
from train.recipe import FreezeSection


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, tiny_tiktoken):
    """(model, processor, items): a tiny model for the tiny vocabulary and three encoded samples, two images
    of different sizes in the first, one in the second, none in the third."""
    spec = FAMILIES[request.param]
    processor = build_family_processor(spec, tiny_tiktoken, min_pixels=32 * 32, max_pixels=96 * 96)
    folder = tmp_path_factory.mktemp("img")
    paths = []
    for i, size in enumerate([(90, 60), (40, 70), (64, 64)]):
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=torch.Generator().manual_seed(i))
        Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{i}.png")
        paths.append(folder / f"{i}.png")
    records = [
        [
            {
                "from": "user",
                "value": f"<img>{paths[0]}</img><img>{paths[1]}</img>Which is <ref>wider</ref>?",
            },
            {"from": "assistant", "value": "<ref>The first</ref><box>(0,0),(999,999)</box>."},
            {"from": "user", "value": "Sure?"},
            {"from": "assistant", "value": "Yes."},
        ],
        [
            {"from": "system", "value": "Be brief."},
            {"from": "user", "value": f"Colour? <img>{paths[2]}</img>"},
            {"from": "assistant", "value": "Noise."},
        ],
        [{"from": "user", "value": "Say hi."}, {"from": "assistant", "value": "Hi there!"}],
    ]
    items = [encode_record(processor, {"conversations": c}, spec.box_convention) for c in records]
    torch.manual_seed(0)
    model = HFFamilyModel.from_preset(f"{spec.name}_tiny", tokenizer=processor.tokenizer).float()
    return model, processor, items


def test_padded_loss_is_the_hf_models_own_loss(family):
    """Our positions and summed loss against the model's own forward (its positions, its mean loss)."""
    model, processor, items = family
    batch = collate_family_batch(items, processor.tokenizer.pad_token_id)
    ours = model(**batch)
    theirs = model.hf(
        **batch, mm_token_type_ids=model.mrope.mm_token_type_ids(batch["input_ids"]), use_cache=False
    )
    assert torch.isfinite(ours.loss)
    assert ours.num_tokens == sum(sum(label != -100 for label in s.labels[1:]) for s, _ in items)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "freeze, trained",
    [
        (FreezeSection(vision="frozen", resampler="train", llm="frozen", embeddings="frozen"), {"resampler"}),
        (FreezeSection(vision="train", resampler="frozen", llm="frozen", embeddings="frozen"), {"vision"}),
        (FreezeSection(vision="frozen", resampler="train", llm="train"), {"resampler", "llm"}),
    ],
)
def test_gradients_reach_exactly_the_parts_the_freezing_names(family, freeze, trained):
    model, processor, items = family
    apply_freezing(model, freeze)
    model.zero_grad(set_to_none=True)
    model(**collate_family_batch(items, processor.tokenizer.pad_token_id)).loss_sum.backward()
    prefixes = model.part_prefixes()
    for name, param in model.named_parameters():
        part = next(p for p in ("vision", "resampler", "llm") if name.startswith(prefixes[p]))
        if part in trained:
            assert param.grad is not None, name
        else:
            assert param.grad is None and not param.requires_grad, name
    got_signal = {
        p
        for p in trained
        if any(
            param.grad is not None and param.grad.abs().sum() > 0
            for name, param in model.named_parameters()
            if name.startswith(prefixes[p])
        )
    }
    assert got_signal == trained
    model.requires_grad_(True)
    model.zero_grad(set_to_none=True)


def test_a_packed_row_equals_its_samples_one_by_one(family):
    """fp32: loss sum and every gradient of one packed row (3 samples, 3 images, a text-only sample and the
    row's padding) equal the sums over the samples run alone."""
    model, processor, items = family
    pad_id = processor.tokenizer.pad_token_id
    model.requires_grad_(True)

    model.zero_grad(set_to_none=True)
    packed = collate_family_batch(items, pad_id, pack_to=sum(len(s.input_ids) for s, _ in items) + 5)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    out = model(**packed)
    out.loss_sum.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad(set_to_none=True)
    loss_sum, num_tokens = 0.0, 0
    for item in items:
        alone = model(**collate_family_batch([item], pad_id))
        alone.loss_sum.backward()
        loss_sum, num_tokens = loss_sum + alone.loss_sum.detach(), num_tokens + alone.num_tokens
    assert out.num_tokens == num_tokens
    torch.testing.assert_close(out.loss_sum.detach(), loss_sum, rtol=1e-5, atol=1e-5)
    one_by_one = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert packed_grads.keys() == one_by_one.keys()
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, one_by_one[name], rtol=1e-4, atol=1e-6, msg=name)
    model.zero_grad(set_to_none=True)


def test_packed_positions_restart_per_sample(family):
    model, processor, items = family
    packed = collate_family_batch(
        items, processor.tokenizer.pad_token_id, pack_to=sum(len(s.input_ids) for s, _ in items) + 5
    )
    positions = model.mrope.packed(packed["input_ids"], packed.get("image_grid_thw"), packed["cu_seq_lens"])
    bounds = packed["cu_seq_lens"].tolist()
    grids = packed["image_grid_thw"]
    counts = [2, 1, 0]
    for k, (start, end) in enumerate(zip(bounds[:3], bounds[1:4])):
        alone = model.mrope.padded(
            packed["input_ids"][:, start:end],
            grids[sum(counts[:k]) : sum(counts[: k + 1])] if counts[k] else None,
        )
        assert torch.equal(positions[1:, :, start:end], alone)
        assert positions[0, 0, start:end].tolist() == list(range(end - start))


FORWARD_KEYS = ("input_ids", "labels", "pixel_values", "image_grid_thw", "attention_mask", "position_ids")
FORWARD_KEYS += ("cu_seq_lens", "max_length", "label_positions")


@pytest.mark.parametrize("packing", [True, False])
def test_the_trainers_collator_computes_m_rope_in_the_workers_with_the_same_loss(family, packing):
    """Given the model's MRope (pickled, as DataLoader workers receive it), the trainer's Collator ships the
    position ids the model would otherwise compute inside the step (a host loop with GPU round trips): 4 rows
    packed, 3 padded, equal to the model's own, the same loss, and sliced with the rows when a step is split
    into forwards of one row each."""
    model, processor, items = family
    pad_id = processor.tokenizer.pad_token_id
    dataset_items = [
        {
            "input_ids": torch.tensor(s.input_ids),
            "labels": torch.tensor(s.labels),
            "pixel_values": p.get("pixel_values"),
            "image_grid_thw": p.get("image_grid_thw", torch.zeros(0, 3, dtype=torch.long)),
            "truncated": False,
        }
        for s, p in items
    ]
    row_len = max(len(s.input_ids) for s, _ in items)  # the longest alone: rows of 1-2 samples
    collate = Collator(pad_id, image_size=0, row_len=row_len, packing=packing)
    without = collate(dataset_items)
    collate.mrope = pickle.loads(pickle.dumps(model.mrope))
    batch = collate(dataset_items)

    grids = batch["image_grid_thw"]
    if packing:
        expected = model.mrope.packed(batch["input_ids"], grids, batch["cu_seq_lens"])
    else:
        expected = model.mrope.padded(batch["input_ids"], grids, batch["attention_mask"])
    assert batch["position_ids"].shape[0] == (4 if packing else 3)
    assert torch.equal(batch["position_ids"], expected)
    assert without["position_ids"].dim() == 2  # without it the model computes them
    with torch.no_grad():
        loss = model(**{k: batch[k] for k in FORWARD_KEYS if k in batch}).loss_sum
        loss_without = model(**{k: without[k] for k in FORWARD_KEYS if k in without}).loss_sum
    assert torch.equal(loss, loss_without)

    rows, width = batch["input_ids"].shape
    assert rows > 1
    parts = split_rows(batch, width, model.placeholder.start)
    assert len(parts) == rows
    for r, part in enumerate(parts):
        assert torch.equal(part["position_ids"], batch["position_ids"][:, r : r + 1])


def test_a_text_only_training_batch_still_reaches_every_vision_parameter(family):
    """Zero gradients (not none) on the ViT and projector, so ranks with and without images hold the same
    parameters under DDP/ZeRO; the loss is unchanged."""
    model, processor, items = family
    batch = collate_family_batch(items[2:], processor.tokenizer.pad_token_id)
    assert "pixel_values" not in batch
    model.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    model.train()
    out = model(**batch)
    out.loss_sum.backward()
    prefixes = model.part_prefixes()
    vision = [
        (n, p)
        for n, p in model.named_parameters()
        if n.startswith(prefixes["vision"] + prefixes["resampler"])
    ]
    assert vision and all(p.grad is not None and not p.grad.any() for _, p in vision)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).loss_sum, out.loss_sum.detach())
    model.train()
    model.zero_grad(set_to_none=True)


def test_gradient_checkpointing_recomputes_the_chosen_layers_and_changes_nothing(family):
    model, processor, items = family
    batch = collate_family_batch(items[:2], processor.tokenizer.pad_token_id)
    model.requires_grad_(True)
    model.train()

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor], list[int]]:
        calls = []
        layers = model.llm.get_decoder().layers
        # On the first module inside each layer: transformers checkpoints a layer's forward with the layer's
        # own hooks outside, and torch's recompute stops early, once the last tensor backward needs is back.
        hooks = [
            layer.input_layernorm.register_forward_hook(lambda mod, args, out, i=i: calls.append(i))
            for i, layer in enumerate(layers)
        ]
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss_sum
        loss.backward()
        for hook in hooks:
            hook.remove()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sorted(calls)

    plain_loss, plain_grads, plain_calls = run()
    model.set_gradient_checkpointing(True, llm_layers=1)
    try:
        loss, grads, calls = run()
    finally:
        model.set_gradient_checkpointing(False)
    assert plain_calls == [0, 1] and calls == [0, 0, 1]  # layer 0 recomputed in backward, layer 1 kept
    torch.testing.assert_close(loss, plain_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], msg=name)
    model.zero_grad(set_to_none=True)


def test_lora_by_the_adapters_pattern_trains_adapters_and_the_saved_projector_only(family):
    model, processor, items = family
    lora_model = copy.deepcopy(model).requires_grad_(False)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        modules_to_save=["merger"],
        target_modules=lora_model.lora_target_pattern(["q_proj", "gate_proj"], ["attn.qkv"]),
    )
    wrapped = peft.get_peft_model(lora_model, config)
    wrapped(**collate_family_batch(items, processor.tokenizer.pad_token_id)).loss_sum.backward()
    trained = {n for n, p in wrapped.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert all("lora_" in n or ".merger.modules_to_save." in n for n in trained), trained
    llm_adapters = [n for n in trained if "language_model" in n]
    vit_adapters = [n for n in trained if "visual.blocks" in n]
    assert len(llm_adapters) == 2 * 2 * 2 and len(vit_adapters) == 2 * 2  # (A, B) per adapted layer
    assert not any(".mlp." in n for n in vit_adapters)


def test_token_logps_and_label_positions_give_the_same_loss(family):
    """The switches VLM.forward has for DPO and for a loss computed only at supervised positions."""
    model, processor, items = family
    batch = collate_family_batch(items, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        plain = model(**batch)
        logps = model(**batch, return_token_logps=True)
        positioned = model(**batch, label_positions=supervised_positions(batch["labels"]))
    assert logps.token_logps.shape == batch["labels"].shape
    torch.testing.assert_close(-logps.token_logps.sum(), plain.loss_sum)
    torch.testing.assert_close(positioned.loss_sum, plain.loss_sum)
    assert plain.num_tokens == logps.num_tokens == positioned.num_tokens
