"""One optimiser step: freezing per stage, token-weighted loss over micro-batches (= one big batch),
masked labels ignored, the schedule, ViT layer-wise lr decay."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.conftest import single_process_engine
from train.freeze import apply_freezing, trainable_table
from train.loop import accumulate_gradients
from train.optim import build_optimizer, lr_factor, vit_lr_scale
from train.recipe import ScheduleSection, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]


def tiny_recipe(**sections):
    raw = {
        "model": {"preset": "tiny"},
        "data": {"paths": ["x"]},
        "train": {"steps": 10, "bf16": False},
        **sections,
    }
    return recipe_from_dict(raw)


def make_batch(model, lengths, seed, num_supervised):
    """Text-only rows of given lengths, right-padded; the last `num_supervised[i]` tokens of row i
    are supervised (so rows carry different token counts)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config["vocab_size"]
    L = max(lengths)
    ids = torch.randint(20, vocab, (len(lengths), L), generator=g)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for r, (n, s) in enumerate(zip(lengths, num_supervised)):
        mask[r, :n] = 1
        labels[r, n - s : n] = ids[r, n - s : n]
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "position_ids": pos,
        "pixel_values": None,
        "num_samples": len(lengths),
        "sample_lengths": list(lengths),
    }


def concat(a, b):
    L = max(a["input_ids"].shape[1], b["input_ids"].shape[1])

    def pad(t, v):
        return torch.nn.functional.pad(t, (0, L - t.shape[1]), value=v)

    out = {
        k: torch.cat([pad(a[k], v), pad(b[k], v)])
        for k, v in [("input_ids", 0), ("labels", -100), ("attention_mask", 0), ("position_ids", 0)]
    }
    return {
        **out,
        "pixel_values": None,
        "num_samples": a["num_samples"] + b["num_samples"],
        "sample_lengths": a["sample_lengths"] + b["sample_lengths"],
    }


@pytest.mark.parametrize(
    "stage,expected",
    [
        ("pretrain.yaml", {"vision": True, "resampler": True, "llm": False}),
        ("multitask.yaml", {"vision": True, "resampler": True, "llm": True}),
        ("sft.yaml", {"vision": False, "resampler": True, "llm": True}),
    ],
)
def test_each_stage_freezes_exactly_what_its_recipe_says(tiny_vlm, stage, expected):
    model = copy.deepcopy(tiny_vlm)
    recipe = load_recipe(REPO / "recipes" / stage)
    apply_freezing(model, recipe.freeze)
    for group, trains in expected.items():
        flags = {p.requires_grad for m in model.module_groups()[group] for p in m.parameters()}
        if group == "llm" and not trains:  # embeddings: "auto" follows train_embeddings of the tiny tokenizer
            flags = {
                p.requires_grad
                for n, p in model.llm.named_parameters()
                if "embed_tokens" not in n and "lm_head" not in n
            }
        assert flags == {trains}, f"{stage}: {group}"
    assert "resampler" in trainable_table(model)


def test_embeddings_train_with_a_frozen_llm_when_tokens_were_added(tiny_vlm):
    model = copy.deepcopy(tiny_vlm)
    model.config.train_embeddings = True
    apply_freezing(model, load_recipe(REPO / "recipes" / "pretrain.yaml").freeze)
    assert model.llm.get_input_embeddings().weight.requires_grad
    assert model.llm.get_output_embeddings().weight.requires_grad
    assert not model.llm.model.layers[0].self_attn.q_proj.weight.requires_grad


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulating_k_micro_batches_gives_the_gradient_of_one_big_batch(tiny_vlm):
    recipe = tiny_recipe(freeze={"vision": "train", "llm": "train"})
    a = make_batch(tiny_vlm, [12, 7], seed=1, num_supervised=[9, 2])
    b = make_batch(tiny_vlm, [5, 10], seed=2, num_supervised=[1, 8])  # other token counts than a

    small = copy.deepcopy(tiny_vlm).train()
    loss_small, counts = accumulate_gradients(single_process_engine(small, recipe), [a, b])
    big = copy.deepcopy(tiny_vlm).train()
    loss_big, _ = accumulate_gradients(single_process_engine(big, recipe), [concat(a, b)])

    # [supervised, sample tokens, samples, images, sum of squared lengths] + the objective's [supervised]
    assert counts.tolist() == [
        9 + 2 + 1 + 8,
        12 + 7 + 5 + 10,
        4,
        0,
        12**2 + 7**2 + 5**2 + 10**2,
        9 + 2 + 1 + 8,
    ]
    torch.testing.assert_close(loss_small, loss_big, rtol=1e-5, atol=1e-5)
    g_small, g_big = _grads(small), _grads(big)
    assert g_small.keys() == g_big.keys() and len(g_small) > 10
    for name in g_big:
        torch.testing.assert_close(g_small[name], g_big[name], rtol=1e-4, atol=1e-6, msg=name)

    # And it is NOT the mean of per-micro-batch means, which would weight b's few tokens more.
    def model_inputs(batch):
        return {k: v for k, v in batch.items() if k not in ("num_samples", "sample_lengths")}

    mean_of_means = 0.5 * (small(**model_inputs(a)).loss + small(**model_inputs(b)).loss)
    assert abs(float(mean_of_means.detach()) - float(loss_big[0] / counts[0])) > 1e-4


def test_loss_ignores_masked_labels(tiny_vlm):
    recipe = tiny_recipe(freeze={"llm": "train"})
    a = make_batch(tiny_vlm, [12, 9], seed=3, num_supervised=[4, 3])
    model = copy.deepcopy(tiny_vlm).train()
    loss_sum, counts = accumulate_gradients(single_process_engine(model, recipe), [a])
    assert int(counts[0]) == 4 + 3
    # The same sum computed by hand over the supervised (shifted) positions only.
    with torch.no_grad():
        logits = model(
            a["input_ids"], attention_mask=a["attention_mask"], position_ids=a["position_ids"]
        ).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    target = a["labels"][:, 1:]
    keep = target != -100
    manual = -logp[keep].gather(-1, target[keep].unsqueeze(-1)).sum()
    torch.testing.assert_close(loss_sum[0], manual, rtol=1e-4, atol=1e-4)
    # Supervising one more token changes both the count and the loss.
    more = dict(a, labels=a["labels"].clone())
    more["labels"][0, 3] = a["input_ids"][0, 3]
    l3, c3 = accumulate_gradients(single_process_engine(copy.deepcopy(tiny_vlm).train(), recipe), [more])
    assert int(c3[0]) == 8 and not torch.allclose(loss_sum, l3)


def test_cosine_schedule_warms_up_then_decays_to_min_lr():
    cfg = ScheduleSection(name="cosine", warmup_steps=10, min_lr=1e-6)
    lrs = [2e-4 * lr_factor(s, 100, 2e-4, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(2e-5) and lrs[9] == pytest.approx(2e-4)
    assert all(x > y for x, y in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(1e-6)


def test_vit_layer_decay_scales_lower_blocks_more(tiny_vlm):
    assert vit_lr_scale("vision.blocks.1.attn.qkv.weight", 2, 0.95) == pytest.approx(0.95)
    assert vit_lr_scale("vision.blocks.0.attn.qkv.weight", 2, 0.95) == pytest.approx(0.95**2)
    assert vit_lr_scale("vision.patch_embed.weight", 2, 0.95) == pytest.approx(0.95**3)
    assert vit_lr_scale("resampler.proj", 2, 0.95) == 1.0
    model = copy.deepcopy(tiny_vlm)
    recipe = tiny_recipe(freeze={"vision": "train"}, optim={"lr": 1e-3, "vit_layer_decay": 0.9})
    apply_freezing(model, recipe.freeze)
    opt = build_optimizer(model, recipe.optim, num_vit_blocks=2)
    assert sorted({round(g["lr"], 8) for g in opt.param_groups}) == [0.000729, 0.00081, 0.0009, 0.001]
    no_decay = [g for g in opt.param_groups if g["weight_decay"] == 0.0]
    assert sum(len(g["params"]) for g in no_decay) > 0


def _tiny_recipe_at(tmp_path, tiny_tokenizer, *overrides):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    return load_recipe(
        Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "base.yaml",
        [f"model.tokenizer_path={tmp_path / 'tok'}", "model.preset=tiny", *overrides],
    )


@pytest.mark.parametrize(
    "mode, bf16, frozen_bf16, frozen, trainable",
    [
        ("zero2", True, True, torch.bfloat16, torch.bfloat16),  # DeepSpeed: all bf16, its own fp32 masters
        ("zero3", True, False, torch.bfloat16, torch.bfloat16),
        ("zero3", False, True, torch.float32, torch.float32),
        ("ddp", True, True, torch.bfloat16, torch.float32),  # frozen bf16, trainable fp32 for the optimiser
        ("auto", True, True, torch.bfloat16, torch.float32),
        ("auto", True, False, torch.float32, torch.float32),
        ("auto", False, True, torch.float32, torch.float32),  # no autocast: everything fp32
    ],
)
def test_models_are_built_in_their_storage_dtypes(
    tmp_path, tiny_tokenizer, mode, bf16, frozen_bf16, frozen, trainable
):
    """The model is built straight in its final dtypes (it never exists in fp32 as a whole): DeepSpeed bf16
    casts the module and keeps fp32 masters itself; elsewhere frozen weights are bf16 (perf.frozen_bf16)
    and the ones that train fp32 (the optimiser updates them)."""
    from train.assemble import build_model

    recipe = _tiny_recipe_at(
        tmp_path,
        tiny_tokenizer,
        f"parallel.mode={mode}",
        f"train.bf16={bf16}",
        f"perf.frozen_bf16={frozen_bf16}",
    )  # tiny: vision frozen, resampler + llm train
    model, _ = build_model(recipe)
    assert {p.dtype for p in model.vision.parameters()} == {frozen}
    assert {p.dtype for p in model.resampler.parameters()} == {trainable}


def test_an_export_loads_with_trainable_weights_exact_and_frozen_ones_in_bf16(
    tmp_path, tiny_tokenizer, tiny_vlm
):
    """Loading in mixed storage must not round the weights that go on training through bf16."""
    from train.assemble import build_model

    export = tmp_path / "export"
    model = copy.deepcopy(tiny_vlm)
    model.tokenizer = tiny_tokenizer
    model.save_pretrained(export)
    recipe = _tiny_recipe_at(
        tmp_path,
        tiny_tokenizer,
        f"model.init_from={export}",
        "model.preset=null",
        "train.bf16=true",
        "freeze.vision=frozen",
        "freeze.resampler=train",
    )
    loaded, _ = build_model(recipe)
    assert torch.equal(loaded.resampler.proj, model.resampler.proj)  # fp32, bit for bit
    assert loaded.vision.patch_embed.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.vision.patch_embed.weight, model.vision.patch_embed.weight.bfloat16())


def test_pad_vocab_to_gives_the_preset_more_embedding_rows_than_the_tokenizer(tmp_path, tiny_tokenizer):
    """A small tokenizer can still model Qwen's 151,936-row embedding and LM head (benchmarks)."""
    from train.assemble import build_model

    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    base = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "base.yaml"
    overrides = [f"model.tokenizer_path={tmp_path / 'tok'}", "model.preset=tiny"]
    plain, _ = build_model(load_recipe(base, overrides))
    padded, _ = build_model(load_recipe(base, [*overrides, "model.pad_vocab_to=4096"]))
    assert plain.llm.get_input_embeddings().num_embeddings == len(tiny_tokenizer) < 4096
    assert padded.llm.get_input_embeddings().num_embeddings == 4096
    assert padded.llm.get_output_embeddings().weight.shape[0] == 4096


def test_a_micro_batch_split_into_forwards_of_whole_rows_keeps_loss_and_gradients(tiny_vlm, tiny_tokenizer):
    """train.max_forward_tokens: a micro-batch of packed rows runs as several forward/backward passes (bounded
    activation memory) and the step's loss and gradients are those of one pass over the whole micro-batch."""
    from conftest import packed_batches

    from data.collate import split_rows
    from data.packing import supervised_positions

    rows = [
        packed_batches(tiny_vlm, tiny_tokenizer, [lengths], seed=i)[0]
        for i, lengths in enumerate([(20, 31), (44, 7), (25, 26)])
    ]  # three rows of equal width
    batch = {
        k: torch.cat([r[k] for r in rows]) for k in ("input_ids", "labels", "position_ids", "pixel_values")
    }
    width = batch["input_ids"].shape[1]
    segments = [int(n) for r in rows for n in (r["cu_seq_lens"][1:] - r["cu_seq_lens"][:-1])]
    batch["cu_seq_lens"] = torch.tensor([0, *segments], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    batch["max_length"] = max(segments)
    batch.update(num_samples=6, sample_lengths=[20 + 18, 31 + 18, 44 + 18, 7 + 18, 25 + 18, 26 + 18])

    batch["label_positions"] = supervised_positions(batch["labels"])

    parts = split_rows(batch, 2 * width, tiny_vlm.config.image_start_id)
    assert [p["input_ids"].shape[0] for p in parts] == [2, 1]
    for part in parts:  # each forward gets the supervised positions of its own rows
        assert torch.equal(part["label_positions"], supervised_positions(part["labels"]))
    assert [len(p["pixel_values"]) for p in parts] == [4, 2]
    assert parts[1]["cu_seq_lens"].tolist() == [0] + rows[2]["cu_seq_lens"][1:].tolist()

    recipe = tiny_recipe()
    grads = []
    for max_tokens in (None, 2 * width, 1):
        model = copy.deepcopy(tiny_vlm).train()
        engine = single_process_engine(model, recipe)
        loss, counts = accumulate_gradients(
            engine, [batch], max_forward_tokens=max_tokens, image_start_id=tiny_vlm.config.image_start_id
        )
        grads.append((loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    for loss, g in grads[1:]:
        torch.testing.assert_close(loss, grads[0][0], rtol=1e-5, atol=1e-5)
        for name, value in grads[0][1].items():
            torch.testing.assert_close(g[name], value, rtol=1e-4, atol=1e-6)
