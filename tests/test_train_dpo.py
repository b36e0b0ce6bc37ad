"""DPO (train/dpo.py): the loss against a hand computation and TRL's formula, answer log-probs against the
model's logits, the pair-weighted normalisation over micro-batches, and the three reference modes."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from data.collate import Collator
from data.dataset import DataConfig, build_dataloader
from data.sample import IGNORE_INDEX
from eval_mm.metrics import REWARD_MARGIN_TOLERANCE
from models.loss import causal_lm_loss_sum, causal_lm_token_logps
from models.vlm import frozen_vision_shared
from tests.conftest import single_process_engine
from train.dpo import (
    AdapterDisabledReference,
    DirectPreference,
    FrozenCopyReference,
    copy_for_reference,
    dpo_losses,
    pair_logps,
    pairs_won,
    place_frozen_copy,
    precompute_reference_logps,
    runs_adapter_off_reference,
)
from train.freeze import apply_freezing
from train.loop import NUM_COUNTS, accumulate_gradients, to_device
from train.lora import apply_lora
from train.recipe import LoraSection, recipe_from_dict

LOG2 = math.log(2)


# ---------------------------------------------------------------------------------------------- loss
def test_dpo_loss_matches_a_hand_computation():
    # pi_c = -10, pi_r = -12, ref_c = -11, ref_r = -11.5: margin = (-10 + 12) - (-11 + 11.5) = 1.5
    one = [torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.5)]
    losses, chosen, rejected = dpo_losses(*one, loss="sigmoid", beta=0.5)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.75)))  # -log sigmoid(0.5 * 1.5)
    assert (chosen.item(), rejected.item()) == (
        pytest.approx(0.5),
        pytest.approx(-0.25),
    )  # 0.5 (-10+11), 0.5 (-12+11.5)
    smoothed, _, _ = dpo_losses(*one, loss="sigmoid", beta=0.5, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(
        0.9 * math.log(1 + math.exp(-0.75)) + 0.1 * math.log(1 + math.exp(0.75))
    )
    ipo, _, _ = dpo_losses(*one, loss="ipo", beta=0.5)
    assert ipo.item() == pytest.approx((1.5 - 1 / (2 * 0.5)) ** 2)


def test_a_pair_is_won_only_by_a_margin_beyond_float_noise():
    """rewards/accuracies counts a pair when its reward margin / beta (nats) exceeds the stated tolerance:
    a policy equal to its reference (margins of +-1e-7, DPO's first step) wins no pair."""
    beta = 0.1
    tolerance = REWARD_MARGIN_TOLERANCE
    margins = torch.tensor([1e-7, -1e-7, 0.0, 0.5 * tolerance, 2 * tolerance, -1.0])
    chosen, rejected = beta * margins, torch.zeros_like(margins)
    assert pairs_won(chosen, rejected, beta).tolist() == [False, False, False, False, True, False]


@pytest.mark.parametrize("loss, beta, ls", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.3, 0.2), ("ipo", 0.1, 0.0)])
def test_dpo_loss_matches_trls_published_formula(loss, beta, ls):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-20 * torch.rand(64, generator=g) for _ in range(4))
    # TRL DPOTrainer.dpo_loss, as published
    pi_logratios = pc - pr
    ref_logratios = rc - rr
    logits = pi_logratios - ref_logratios
    if loss == "sigmoid":
        trl = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    else:
        trl = (logits - 1 / (2 * beta)) ** 2
    ours, chosen, rejected = dpo_losses(pc, pr, rc, rr, loss=loss, beta=beta, label_smoothing=ls)
    torch.testing.assert_close(ours, trl)
    torch.testing.assert_close(chosen, beta * (pc - rc))
    torch.testing.assert_close(rejected, beta * (pr - rr))


# ---------------------------------------------------------------------------------- answer log-probs
def test_token_log_probs_sum_to_the_sft_loss_and_every_implementation_agrees():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(2, 9, 16, generator=g), torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 50, (2, 9), generator=g)
    labels[:, :3] = IGNORE_INDEX
    torch_logps = causal_lm_token_logps(hidden, weight, labels, impl="torch")
    assert torch_logps.shape == (2, 9) and (torch_logps[labels == IGNORE_INDEX] == 0).all()
    loss_sum, _ = causal_lm_loss_sum(hidden, weight, labels)
    torch.testing.assert_close(-torch_logps.sum(), loss_sum)
    for impl in ("chunked", "auto"):
        torch.testing.assert_close(causal_lm_token_logps(hidden, weight, labels, impl=impl), torch_logps)


def pair_item(vocab, prompt, chosen, rejected, seed, image=None):
    """A text pair (random ids) sharing its prompt; labels on the answers only,
    as data.chatml renders them."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(20, vocab, (prompt,), generator=g)
    if image is not None:  # (start id, pad id, end id, num pads, pixels): an image span in the prompt
        start, pad_id, end, n, pixels = image
        head = torch.cat([head[:2], torch.tensor([start] + [pad_id] * n + [end]), head[2:]])

    def seq(n):
        ids = torch.cat([head, torch.randint(20, vocab, (n,), generator=g)])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[len(head) :] = ids[len(head) :]
        return {"input_ids": ids, "labels": labels}

    pixels = image[4] if image is not None else torch.zeros(0, 3, 84, 84)
    return {
        "chosen": seq(chosen),
        "rejected": seq(rejected),
        "pixel_values": pixels,
        "truncated": False,
        "index": seed,
    }


def collate(items, packing, max_len=256):
    batch = Collator(pad_id=0, image_size=84, row_len=max_len, packing=packing)(items)
    batch.pop("_stats")
    return batch


def manual_answer_logps(model, item):
    """Each sequence alone through the model: sum of log p(label_t | < t) over its labelled positions."""
    out = []
    for key in ("chosen", "rejected"):
        ids, labels = item[key]["input_ids"][None], item[key]["labels"][None]
        pixels = item["pixel_values"] if len(item["pixel_values"]) else None
        logp = torch.log_softmax(model(ids, pixel_values=pixels).logits[:, :-1].float(), -1)
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        out.append(logp[keep].gather(-1, target[keep][:, None]).sum())
    return torch.stack(out)


@pytest.mark.parametrize("packing", [False, True])
def test_answer_log_probs_of_a_batch_equal_each_sequence_scored_alone(tiny_vlm, packing):
    vocab = tiny_vlm.config.text_config["vocab_size"]
    items = [
        pair_item(vocab, 7, 4, 6, seed=1),
        pair_item(vocab, 5, 3, 2, seed=2),
        pair_item(vocab, 9, 5, 5, seed=3),
    ]
    batch = collate(items, packing)
    with torch.no_grad():
        out = tiny_vlm(
            batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch["position_ids"],
            labels=batch["labels"],
            return_token_logps=True,
        )
        expected = torch.stack([manual_answer_logps(tiny_vlm, item) for item in items])
    torch.testing.assert_close(pair_logps(out.token_logps, batch), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(-out.token_logps.sum(), out.loss_sum)


# ---------------------------------------------------------------------------- objective and references
def dpo_recipe(**sections):
    raw = {
        "model": {"preset": "tiny"},
        "data": {"paths": ["x"]},
        "train": {"steps": 10, "bf16": False, "stage": "dpo"},
        **sections,
    }
    return recipe_from_dict(raw)


def full_dpo(tiny_vlm, **preference):
    recipe = dpo_recipe(
        freeze={"vision": "frozen", "llm": "train"},
        optim={"lr": 1e-2},
        preference={"reference": "frozen_copy", **preference},
    )
    model = copy.deepcopy(tiny_vlm).train()
    apply_freezing(model, recipe.freeze)
    reference = copy_for_reference(model, recipe)
    engine = single_process_engine(model, recipe)
    objective = DirectPreference(recipe.preference, FrozenCopyReference(place_frozen_copy(reference, engine)))
    return engine, objective


def run_step(engine, objective, batches, max_forward_tokens=None):
    sums, counts = accumulate_gradients(
        engine,
        batches,
        max_forward_tokens=max_forward_tokens,
        image_start_id=engine.model.config.image_start_id,
        objective=objective,
    )
    return objective.metrics(sums.tolist(), counts[NUM_COUNTS:].tolist())


def test_frozen_copy_equals_the_policy_at_step_0_then_stays_where_it_started(tiny_vlm):
    engine, objective = full_dpo(tiny_vlm)
    # MFU counts the reference's forward, but not a frozen tower's encoding, which the policy's serves
    assert objective.runs_reference and not objective.reference_encodes_images
    assert DirectPreference(
        objective.cfg, objective.reference, policy_vision_frozen=False
    ).reference_encodes_images
    vocab = tiny_vlm.config.text_config["vocab_size"]
    batch = collate([pair_item(vocab, 6, 4, 5, seed=s) for s in range(4)], packing=False)
    first = run_step(engine, objective, [batch])
    assert first["loss"] == pytest.approx(LOG2, abs=1e-6)  # margin 0 for every pair: -log sigmoid(0)
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
    engine.step()
    with torch.no_grad():
        reference = objective.reference(engine, batch)
        start = pair_logps(
            tiny_vlm(
                batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                labels=batch["labels"],
                return_token_logps=True,
            ).token_logps,
            batch,
        )
    torch.testing.assert_close(reference, start)  # the reference did not move
    second = run_step(engine, objective, [batch])
    assert second["rewards/margins"] != 0.0 and second["loss"] != pytest.approx(LOG2, abs=1e-6)


def test_step_loss_is_pair_weighted_over_micro_batches_and_the_sft_term_token_weighted(tiny_vlm):
    """1 pair + 3 pairs in two micro-batches give the gradient of the 4 pairs in one batch: each pair
    weighs 1/4 (not 1/2 and 1/6), each chosen token 1/(chosen tokens of the step). So do forwards cut
    between pairs by train.max_forward_tokens, padded (two rows a pair) or packed (a pair in a row)."""
    vocab = tiny_vlm.config.text_config["vocab_size"]
    items = [
        pair_item(vocab, 6, 2, 5, seed=10),
        pair_item(vocab, 4, 7, 3, seed=11),
        pair_item(vocab, 8, 3, 3, seed=12),
        pair_item(vocab, 5, 6, 2, seed=13),
    ]
    packed = collate(items, True, max_len=40)
    assert packed["input_ids"].shape[0] == 2  # two rows of two pairs each
    variants = [
        ([collate(items, False)], None),
        ([collate(items[:1], False), collate(items[1:], False)], None),
        ([collate(items, False)], 1),
        ([packed], 1),
    ]  # max_forward_tokens=1: one pair / row a forward
    grads, metrics = [], []
    for batches, max_forward_tokens in variants:
        engine, objective = full_dpo(tiny_vlm, sft_weight=0.5)
        metrics.append(run_step(engine, objective, batches, max_forward_tokens))
        grads.append({n: p.grad.clone() for n, p in engine.model.named_parameters() if p.grad is not None})
    assert metrics[0]["nll/chosen"] > 0 and metrics[0]["loss"] == pytest.approx(
        LOG2 + 0.5 * metrics[0]["nll/chosen"]
    )
    assert len(grads[0]) > 5
    for m, g in zip(metrics[1:], grads[1:]):
        assert m == pytest.approx(metrics[0], rel=1e-4, abs=1e-6)
        assert g.keys() == grads[0].keys()
        for name in g:
            torch.testing.assert_close(g[name], grads[0][name], rtol=1e-3, atol=1e-5, msg=name)


def test_a_pairs_images_encoded_once_and_shared_with_the_reference_give_the_step_of_separate_copies(
    tiny_vlm, monkeypatch
):
    """The batch holds a pair's images once (image_index) and the frozen ViT encodes them once for reference
    and policy: the step's metrics and gradients are those of every sequence with its own copy, each forward
    encoding its own (as before both changes)."""
    import contextlib

    import train.dpo

    cfg, vocab = tiny_vlm.config, tiny_vlm.config.text_config["vocab_size"]

    def image(seed):
        return (
            cfg.image_start_id,
            cfg.image_pad_id,
            cfg.image_end_id,
            cfg.num_image_tokens,
            torch.randn(1, 3, 84, 84, generator=torch.Generator().manual_seed(seed)),
        )

    items = [
        pair_item(vocab, 6, 4, 5, seed=20, image=image(1)),
        pair_item(vocab, 5, 3, 6, seed=21),
        pair_item(vocab, 7, 5, 2, seed=22, image=image(2)),
    ]
    once = collate(items, packing=True)
    assert once["pixel_values"].shape[0] == 2 and once["image_index"].tolist() == [0, 0, 1, 1]
    copies = {k: v for k, v in once.items() if k != "image_index"}
    copies["pixel_values"] = once["pixel_values"][once["image_index"]]
    runs = []
    for batch, shared in ((once, True), (copies, False)):
        if not shared:
            monkeypatch.setattr(train.dpo, "frozen_vision_shared", lambda *vlms: contextlib.nullcontext())
        engine, objective = full_dpo(tiny_vlm, sft_weight=0.5)
        _perturb_trainable(engine.model)  # policy away from its reference: margins are not 0
        metrics = run_step(engine, objective, [batch])
        runs.append((metrics, {n: p.grad for n, p in engine.model.named_parameters() if p.grad is not None}))
    (metrics_once, grads_once), (metrics_copies, grads_copies) = runs
    assert metrics_once["rewards/margins"] != 0.0
    assert metrics_once == pytest.approx(metrics_copies, rel=1e-5, abs=1e-5)  # margins: differences of sums
    assert grads_once.keys() == grads_copies.keys() and any(".resampler." in f".{n}" for n in grads_once)
    for name, grad in grads_copies.items():
        torch.testing.assert_close(grads_once[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _perturb_trainable(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_adapter_disabled_reference_gives_the_base_models_log_probs(tiny_vlm):
    cfg = tiny_vlm.config
    recipe = dpo_recipe(
        freeze={"vision": "frozen", "resampler": "train", "llm": "frozen"},
        lora={"enabled": True},
        preference={"reference": "adapter_disabled"},
    )
    base = copy.deepcopy(tiny_vlm)
    apply_freezing(base, recipe.freeze)
    untouched = copy.deepcopy(base).eval()
    lora = LoraSection(enabled=True, r=4, alpha=8, dropout=0.0, vision_targets=["attn.qkv", "mlp.fc2"])
    model = apply_lora(base, lora, recipe.freeze)
    _perturb_trainable(model)  # adapters and the resampler (modules_to_save) move away from the base
    engine = single_process_engine(model, recipe)
    engine.eval()
    image = (
        cfg.image_start_id,
        cfg.image_pad_id,
        cfg.image_end_id,
        cfg.num_image_tokens,
        torch.randn(1, 3, 84, 84, generator=torch.Generator().manual_seed(5)),
    )
    batch = collate(
        [pair_item(cfg.text_config["vocab_size"], 6, 4, 5, seed=s, image=image) for s in range(2)], False
    )
    with torch.no_grad():
        reference = AdapterDisabledReference()(engine, batch)
        base_logps = pair_logps(
            untouched(
                batch["input_ids"],
                pixel_values=batch["pixel_values"],
                image_index=batch["image_index"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                labels=batch["labels"],
                return_token_logps=True,
            ).token_logps,
            batch,
        )
        policy = pair_logps(engine.forward_loss(batch, token_logps=True).token_logps, batch)
    torch.testing.assert_close(reference, base_logps, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(policy, base_logps, atol=1e-3)  # the adapter is back on afterwards

    # Adapters that train in the vision tower keep it from sharing one encoding between the reference's
    # forward, adapters off, and the policy's: each forward encodes, and the policy sees its adapters' effect.
    runs = []
    model.get_base_model().vision.register_forward_hook(lambda *args: runs.append(1))
    with torch.no_grad(), frozen_vision_shared(model.get_base_model()):
        shared_reference = AdapterDisabledReference()(engine, batch)
        shared_policy = pair_logps(engine.forward_loss(batch, token_logps=True).token_logps, batch)
    assert len(runs) == 2
    torch.testing.assert_close(shared_reference, reference)
    torch.testing.assert_close(shared_policy, policy)


def write_pairs(root, tokenizer_dir=None, n=6):
    """A folder of preference pairs on small images (text answers of different lengths)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    records = []
    for i in range(n):
        name = list(colours)[i % 3]
        Image.new("RGB", (40, 40), colours[name]).save(root / f"{i}.png")
        wrong = list(colours)[(i + 1) % 3]
        records.append(
            {
                "id": f"p{i}",
                "conversations": [
                    {"from": "user", "value": f"Picture 1: <img>{i}.png</img>\nWhat color is the picture?"}
                ],
                "chosen": {"from": "assistant", "value": f"The picture is {name}."},
                "rejected": {"from": "assistant", "value": f"It is {wrong}" + " and white" * (i % 2) + "."},
            }
        )
    (root / "pairs.json").write_text(json.dumps(records))
    return root / "pairs.json"


def test_precomputed_reference_equals_the_reference_computed_in_the_step(tiny_vlm, tiny_tokenizer, tmp_path):
    pairs = write_pairs(tmp_path)
    loader = build_dataloader(
        DataConfig(paths=[str(pairs)], image_size=84, max_len=128, num_workers=0),
        tiny_tokenizer,
        tiny_vlm.config.num_image_tokens,
        batch_size=4,
        preference=True,
    )
    recipe = dpo_recipe(freeze={"vision": "frozen", "llm": "train"}, preference={"reference": "precomputed"})
    model = copy.deepcopy(tiny_vlm).train()
    apply_freezing(model, recipe.freeze)
    engine = single_process_engine(model, recipe)
    table = precompute_reference_logps(engine, loader, None)
    assert table.shape == (6, 2) and torch.isfinite(table).all()
    assert model.training  # back in train mode for the steps
    frozen = FrozenCopyReference(copy.deepcopy(tiny_vlm).eval())
    for batch in loader:  # shuffled, other batch compositions than the pass above
        batch = to_device(batch, torch.device("cpu"), None)
        with torch.no_grad():
            computed = frozen(engine, batch)
        torch.testing.assert_close(table[batch["pair_index"]], computed, rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------- the trainer, end to end
from tests.test_train_world import REPO, TINY, read_losses, run_train  # noqa: E402


@pytest.fixture(scope="module")
def pairs_world(tmp_path_factory):
    from tests.conftest import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("pairs")
    build_tiny_tokenizer().save_pretrained(root / "tokenizer")
    return write_pairs(root, n=8), root / "tokenizer"


def dpo_args(recipe, pairs_world, run, *extra):
    pairs, tokenizer = pairs_world
    return [
        str(TINY / recipe),
        "model.preset=tiny",
        f"model.tokenizer_path={tokenizer}",
        f"data.paths=[{pairs}]",
        f"checkpoint.out_dir={run}",
        "train.steps=3",
        "log.every=1",
        *extra,
    ]


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dpo_recipe_trains_logs_rewards_and_exports_a_chat_model(pairs_world, tmp_path):
    run = tmp_path / "dpo"
    run_train(dpo_args("dpo.yaml", pairs_world, run))
    first, *_, last = read_metrics(run)
    # Step 1: the policy is its reference, so the loss is ln 2 and every margin is float noise, within the
    # tolerance: no pair is won (counted as "> 0", noise read 0.5 on one install and 0.0 on another).
    assert first["loss"] == pytest.approx(LOG2, abs=1e-5)
    assert abs(first["rewards/margins"]) < 0.1 * REWARD_MARGIN_TOLERANCE  # dpo.yaml's beta: 0.1
    assert first["rewards/accuracies"] == 0.0
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "tokens_per_s",
        "lr",
        "grad_norm",
    ):
        assert key in last and math.isfinite(last[key]), key
    assert last["logps/chosen"] < 0
    info = json.loads((run / "final" / "training_info.json").read_text())
    assert (info["stage"], info["prompt_format"]) == ("dpo", "chatml")
    assert json.loads((run / "final" / "generation_config.json").read_text())["chat_format"] == "chatml"


@pytest.mark.slow
def test_dpo_lora_recipe_adapts_llm_and_vision_tower_and_merges_on_export(pairs_world, tmp_path):
    from safetensors.torch import load_file

    from models import load_vlm

    run = tmp_path / "dpo_lora"
    run_train(dpo_args("dpo_lora.yaml", pairs_world, run, "lora.merge_on_export=true"))
    assert read_losses(run)[1] == pytest.approx(LOG2, abs=1e-5)  # adapter off = the start: margin 0
    saved = load_file(run / "final" / "adapter" / "adapter_model.safetensors")
    assert any("vision.blocks.0.attn.qkv.lora_A" in k for k in saved)
    assert any("llm.model.layers.0.self_attn.q_proj.lora_A" in k for k in saved)
    merged = load_vlm(run / "final" / "merged")
    assert not any("lora" in k for k in merged.state_dict())


@pytest.mark.slow
def test_precomputed_reference_is_stored_once_and_reused_on_resume(pairs_world, tmp_path):
    run = tmp_path / "pre"
    args = dpo_args(
        "dpo.yaml",
        pairs_world,
        run,
        "preference.reference=precomputed",
        "checkpoint.every=1",
        "train.steps=4",
    )
    run_train(args + ["train.stop_after_steps=2"])
    stored = run / "reference_logps.safetensors"
    stamp = os.stat(stored).st_mtime_ns
    proc = run_train(args + ["train.resume=auto"])
    assert "resumed from" in proc.stdout and os.stat(stored).st_mtime_ns == stamp
    losses = read_losses(run)
    assert sorted(losses) == [1, 2, 3, 4] and losses[1] == pytest.approx(LOG2, abs=1e-5)
    other = pairs_world[0].parent / f"other_{tmp_path.name}.json"  # beside the world: its image paths resolve
    other.write_text(json.dumps(json.loads(pairs_world[0].read_text())[:5]))
    proc = run_train_expect_failure([*args[:3], f"data.paths=[{other}]", *args[4:], "train.resume=auto"])
    assert "reference_logps.safetensors was computed for other data" in proc.stderr


def run_train_expect_failure(args):
    import subprocess
    import sys

    from tests.test_train_world import subprocess_env

    proc = subprocess.run(
        [sys.executable, "-m", "train", *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode != 0
    return proc


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, export",
    [
        ("dpo.yaml", "model.safetensors"),  # frozen_copy: a 2nd ZeRO-3 engine
        ("dpo_lora.yaml", "adapter/adapter_model.safetensors"),
    ],
)  # adapter off
def test_zero3_reference_equals_the_sharded_policy_at_step_0_on_two_processes(
    pairs_world, tmp_path, recipe, export
):
    run = tmp_path / "zero3"
    run_train(
        dpo_args(
            recipe, pairs_world, run, "parallel.mode=zero3", "train.micro_batch=1", "train.grad_accum=2"
        ),
        nproc=2,
        timeout=600,
    )
    losses = read_losses(run)
    assert losses[1] == pytest.approx(LOG2, abs=1e-5)  # the reference equals the policy at step 0
    assert all(math.isfinite(v) for v in losses.values()) and losses[3] != pytest.approx(LOG2, abs=1e-5)
    assert (run / "final" / export).is_file()


def test_the_adapter_off_reference_is_recognised_when_auto_picks_it():
    """preference.reference defaults to auto, which LoRA resolves to adapter_disabled: the trainer must see it
    (it keeps the decoder layers uncompiled for that reference pass), not only the explicit setting."""
    raw = {"model": {"preset": "tiny"}, "data": {"paths": ["x.json"]}, "train": {"steps": 1, "stage": "dpo"}}
    assert runs_adapter_off_reference(recipe_from_dict({**raw, "lora": {"enabled": True}}))
    assert runs_adapter_off_reference(
        recipe_from_dict({**raw, "lora": {"enabled": True}, "preference": {"reference": "adapter_disabled"}})
    )
    assert not runs_adapter_off_reference(
        recipe_from_dict({**raw, "lora": {"enabled": True}, "preference": {"reference": "precomputed"}})
    )
    assert not runs_adapter_off_reference(recipe_from_dict(raw))  # auto without LoRA: a frozen copy
    assert not runs_adapter_off_reference(
        recipe_from_dict({**raw, "train": {"steps": 1, "stage": "sft"}, "lora": {"enabled": True}})
    )
