"""DPO (train.stage: dpo) of a Hugging Face family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

A preference pair is encoded by the family's own chat template: each sequence is exactly what the family's
processor makes of the prompt followed by that answer, the two share the prompt and its images, and only the
answer's tokens (and its end marker) are supervised. Padded and packed batches of pairs score every answer
alike. The tiny recipe (recipes/tiny/qwen2_5_vl_dpo_lora.yaml) starts at ln 2 with zero margins (the
reference is the network with its adapter off), trains below ln 2 on a small repeated pair set, logs the
rewards and exports a model that transformers and models.load_pretrained load; the precomputed reference
gives the same run. Bad pairs and unsupported references stop with one ``error:`` line.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.collate import Collator
from data.config import DataConfig
from data.formats import normalize_record
from data.hf_encode import to_messages
from data.sample import IGNORE_INDEX
from data.sample_builder import FamilySampleBuilder
from eval_mm.metrics import REWARD_MARGIN_TOLERANCE
from models.families.processor import build_family_processor
from models.families.specs import FAMILIES, QWEN2_5_VL
from tests.conftest import write_tiny_tiktoken
from tests.test_train_dpo import read_metrics, run_train_expect_failure, write_pairs
from tests.test_train_world import TINY, read_losses, run_train

RECIPE = TINY / "qwen2_5_vl_dpo_lora.yaml"
LOG2 = math.log(2)
MIN_PIXELS, MAX_PIXELS = 3136, 12544  # the tiny family recipes' pixel budget


# ------------------------------------------------------------------------------- encoding of a pair
def preference_record(folder: Path) -> dict:
    """A normalised pair whose prompt has a system turn, an earlier exchange and two images of different
    sizes; the answers differ in length."""
    for name, size in {"wide.png": (200, 90), "small.png": (40, 30)}.items():
        Image.new("RGB", size, (200, 40, 90)).save(folder / name)
    raw = {
        "conversations": [
            {"from": "system", "value": "You judge pictures."},
            {"from": "user", "value": "Picture 1: <img>wide.png</img>\nWhat is it?"},
            {"from": "assistant", "value": "A wide picture."},
            {"from": "user", "value": "Picture 2: <img>small.png</img>\nAnd the colour of this one?"},
        ],
        "chosen": {"from": "assistant", "value": "It is pink."},
        "rejected": {"from": "assistant", "value": "It is green and then the blue."},
    }
    return normalize_record(raw, "qwen", folder)


@pytest.fixture(scope="module", params=list(FAMILIES))
def spec(request):
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def processor(spec, tiny_tiktoken):
    return build_family_processor(spec, tiny_tiktoken, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def family_builder(spec, processor, max_len: int = 1024) -> FamilySampleBuilder:
    config = DataConfig(paths=[], max_len=max_len, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return FamilySampleBuilder(processor, spec.box_convention, config)


def test_each_sequence_of_a_pair_is_the_familys_own_chat_template_of_prompt_and_answer(
    spec, processor, tmp_path
):
    record = preference_record(tmp_path)
    item = family_builder(spec, processor).build(record, "pairs.json record 0")

    messages, paths = to_messages(record["conversations"])
    images = [Image.open(p).convert("RGB") for p in paths]
    prompt_text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = processor(text=[prompt_text], images=images, return_tensors="pt")["input_ids"][0].tolist()
    for key in ("chosen", "rejected"):
        answer = [*messages, {"role": "assistant", "content": record[key]}]
        text = processor.apply_chat_template(answer, tokenize=False)
        expected = processor(text=[text], images=images, return_tensors="pt")
        ids, labels = item[key]["input_ids"].tolist(), item[key]["labels"].tolist()
        assert ids == expected["input_ids"][0].tolist(), key
        # Both share the prompt token for token; the answer and its <|im_end|> are all that is supervised
        # (not the earlier assistant turn, not the newline the template ends the turn with).
        assert ids[: len(prompt)] == prompt
        supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        assert supervised == list(range(len(prompt), len(ids) - 1)), key
        assert [labels[i] for i in supervised] == ids[len(prompt) : len(ids) - 1]
        assert processor.tokenizer.decode(ids[len(prompt) : len(ids) - 1]) == record[key] + "<|im_end|>"
    # The prompt's images once, as the processor makes them, with each image's own grid.
    torch.testing.assert_close(item["pixel_values"], expected["pixel_values"], rtol=0, atol=0)
    assert torch.equal(item["image_grid_thw"], expected["image_grid_thw"])
    assert len(item["image_grid_thw"]) == 2 and not item["truncated"]


def test_a_pair_whose_prompt_fills_max_len_is_an_error_naming_the_record(spec, processor, tmp_path):
    from data.formats import DataFormatError

    record = preference_record(tmp_path)
    with pytest.raises(DataFormatError, match=r"pairs\.json record 3: the chosen sequence has \d+ tokens"):
        family_builder(spec, processor, max_len=30).build(record, "pairs.json record 3")


def test_padded_and_packed_batches_of_pairs_give_each_answer_the_log_prob_it_has_alone(
    tiny_tiktoken, tmp_path
):
    """Two pairs (one with two images, one text-only) in one padded batch, in one packed row (a pair's two
    sequences side by side, each with its own copy of the images) and each sequence alone: the summed answer
    log-probs (train.dpo.pair_logps) agree."""
    from models.families.adapter import HFFamilyModel
    from train.dpo import pair_logps

    processor = build_family_processor(
        QWEN2_5_VL, tiny_tiktoken, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
    )
    builder = family_builder(QWEN2_5_VL, processor)
    text_only = {
        "conversations": [{"from": "user", "value": "Say yes."}],
        "chosen": "Yes.",
        "rejected": "No!",
    }
    items = [builder.build(preference_record(tmp_path), "a"), builder.build(text_only, "b")]
    torch.manual_seed(0)
    model = HFFamilyModel.from_preset("qwen2_5_vl_tiny", tokenizer=processor.tokenizer).eval()
    model.hf.model.language_model.set_attn_implementation("sdpa")

    def score(batch):
        extra = {k: batch[k] for k in ("attention_mask", "cu_seq_lens", "max_length") if k in batch}
        with torch.no_grad():
            out = model(
                batch["input_ids"],
                labels=batch["labels"],
                pixel_values=batch["pixel_values"],
                image_grid_thw=batch.get("image_grid_thw"),
                return_token_logps=True,
                **extra,
            )
        return pair_logps(out.token_logps, batch)

    def alone(item: dict, key: str) -> torch.Tensor:
        """One sequence scored alone: a one-pair batch holding it as both chosen and rejected."""
        one = {**item, "chosen": item[key], "rejected": item[key]}
        return score(Collator(builder.pad_id, image_size=0, row_len=0)([one]))[0, 0]

    padded = score(Collator(builder.pad_id, image_size=0, row_len=0)(items))
    packed_batch = Collator(builder.pad_id, image_size=0, row_len=4096, packing=True)(items)
    assert packed_batch["input_ids"].shape[0] == 1  # both pairs in one row
    packed = score(packed_batch)
    separately = torch.tensor([[alone(item, key) for key in ("chosen", "rejected")] for item in items])
    assert padded.shape == (2, 2) and torch.isfinite(padded).all()
    torch.testing.assert_close(padded, separately, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(packed, separately, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def pairs_world(tmp_path_factory) -> tuple[Path, Path]:
    """Eight pairs on small images (tests.test_train_dpo.write_pairs) and a tiny qwen.tiktoken."""
    root = tmp_path_factory.mktemp("family_pairs")
    write_tiny_tiktoken(root / "qwen.tiktoken")
    return write_pairs(root, n=8), root / "qwen.tiktoken"


def family_dpo_args(pairs_world, run: Path, *extra: str) -> list[str]:
    pairs, tiktoken = pairs_world
    return [
        str(RECIPE),
        "model.preset=qwen2_5_vl_tiny",  # random weights; the recipe's own start is an SFT run's export
        f"model.tokenizer_path={tiktoken}",
        f"data.paths=[{pairs}]",
        f"checkpoint.out_dir={run}",
        "perf.attention=sdpa",  # CPU: no flash varlen kernel
        "log.every=1",
        *extra,
    ]


@pytest.fixture(scope="module")
def dpo_run(pairs_world, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("family_dpo")
    run_train(family_dpo_args(pairs_world, run, "train.steps=8", "lora.merge_on_export=true"))
    return run


def test_step_1_is_ln2_with_zero_margins_then_the_loss_falls_and_rewards_are_logged(dpo_run):
    first, *_, last = read_metrics(dpo_run)
    # The adapter-off reference is the policy at step 1 (LoRA's B starts at 0, no dropout).
    assert first["step"] == 1 and first["loss"] == pytest.approx(LOG2, abs=1e-5)
    assert abs(first["rewards/margins"]) < 0.1 * REWARD_MARGIN_TOLERANCE  # beta 0.1
    assert first["rewards/accuracies"] == 0.0
    assert last["step"] == 8 and last["loss"] < LOG2 - 0.05, last
    assert last["rewards/margins"] > 0 and last["rewards/accuracies"] > 0.5
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "grad_norm"):
        assert math.isfinite(last[key]), key
    assert last["logps/chosen"] < 0


def test_the_export_loads_and_holds_the_adapted_llm(dpo_run, pairs_world):
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLForConditionalGeneration

    from models import load_pretrained
    from models.families.adapter import HFFamilyModel
    from tests.test_train_families import initial_model

    merged = dpo_run / "final" / "merged"
    hf = AutoModelForImageTextToText.from_pretrained(merged)
    assert isinstance(hf, Qwen2_5_VLForConditionalGeneration)
    model, _ = load_pretrained(merged)
    assert isinstance(model, HFFamilyModel)
    exported = dict(model.hf.named_parameters())
    for name, p in hf.named_parameters():
        torch.testing.assert_close(p, exported[name], rtol=0, atol=0, msg=name)
    info = json.loads((dpo_run / "final" / "training_info.json").read_text())
    assert info["stage"] == "dpo"
    assert (dpo_run / "final" / "adapter" / "adapter_model.safetensors").is_file()
    # LoRA on the LLM's linears (merged in) and the merger moved; the ViT's blocks did not.
    start = dict(initial_model(pairs_world[1].parent).hf.named_parameters())
    changed = {name for name, p in exported.items() if not torch.equal(p, start[name])}
    assert any(".language_model.layers." in n and n.endswith("q_proj.weight") for n in changed), changed
    assert any(".merger." in n for n in changed)
    assert not any(n.startswith("model.visual.blocks.") for n in changed)


def test_the_precomputed_reference_gives_the_adapter_off_references_run(dpo_run, pairs_world, tmp_path):
    run = tmp_path / "precomputed"
    run_train(family_dpo_args(pairs_world, run, "train.steps=3", "preference.reference=precomputed"))
    assert (run / "reference_logps.safetensors").is_file()
    losses, reference = read_losses(run), read_losses(dpo_run)
    for step in (1, 2, 3):
        assert losses[step] == pytest.approx(reference[step], rel=1e-4), step


@pytest.mark.parametrize(
    "edit, override, message",
    [
        ("identical", "data.check=fast", r"record 2: 'chosen' and 'rejected' are identical"),
        (None, "data.max_len=20", r"record \d: the chosen sequence has \d+ tokens and max_len=20"),
        (None, "data.check=off data.max_len=20", r"record \d: the chosen sequence has \d+ tokens"),
    ],
)
def test_a_bad_pair_stops_the_family_run_with_one_error_line(pairs_world, tmp_path, edit, override, message):
    pairs, _ = pairs_world
    if edit == "identical":
        records = json.loads(pairs.read_text())
        records[2]["rejected"] = records[2]["chosen"]
        pairs = pairs.parent / f"identical_{tmp_path.name}.json"  # beside the images it names
        pairs.write_text(json.dumps(records))
    args = family_dpo_args((pairs, pairs_world[1]), tmp_path / "run", "train.steps=1", *override.split())
    proc = run_train_expect_failure(args)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert str(pairs) in errors[0] and re.search(message, errors[0]), errors[0]


def test_a_family_dpo_recipe_refuses_a_frozen_copy_reference():
    from train.recipe import RecipeError, load_recipe

    base = ["data.paths=[x.json]", "model.preset=qwen2_5_vl_tiny"]
    for reference in ("frozen_copy", "auto"):  # auto: a frozen copy without LoRA:
        with pytest.raises(RecipeError, match="takes 'preference.reference: adapter_disabled'"):
            load_recipe(RECIPE, [*base, f"preference.reference={reference}", "lora.enabled=false"])
    assert load_recipe(RECIPE, [*base, "preference.reference=precomputed"]).train.stage == "dpo"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_the_shipped_family_dpo_recipes_are_their_lora_sft_recipes_on_pairs(family):
    from tests.test_train_world import REPO
    from train.recipe import load_recipe

    dpo, sft = (load_recipe(REPO / "recipes" / family / name) for name in ("dpo_lora.yaml", "sft_lora.yaml"))
    assert dpo.model == sft.model and dpo.model.family == family
    assert (dpo.lora.targets, dpo.freeze) == (sft.lora.targets, sft.freeze)
    assert (dpo.train.stage, dpo.preference.reference, dpo.lora.dropout) == ("dpo", "adapter_disabled", 0.0)
    assert dpo.data.pack_len >= 2 * dpo.data.max_len and dpo.perf.attention == "varlen"
