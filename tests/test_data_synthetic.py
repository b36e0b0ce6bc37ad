"""data.synthetic: deterministic per seed, and every file it writes is readable by our own loaders."""

import filecmp
import json

import pytest
from transformers import AutoTokenizer

from data.dataset import DataConfig, build_dataloader
from data.formats import load_records
from data.synthetic import COLORS, Thing, draw_shapes, generate, preference_pairs
from data.text import normalize_box, parse_boxes
from models.tokens import VLM_SPECIAL_TOKENS


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "a"
    manifest = generate(out, seed=5, n_train=40, n_eval=12, image_size=64, vocab_size=600)
    return out, manifest


def _all_files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_two_runs_with_the_same_seed_write_identical_bytes(world, tmp_path):
    out, _ = world
    generate(tmp_path / "b", seed=5, n_train=40, n_eval=12, image_size=64, vocab_size=600)
    files = _all_files(out)
    assert files == _all_files(tmp_path / "b") and len(files) > 52
    match, mismatch, errors = filecmp.cmpfiles(out, tmp_path / "b", [str(f) for f in files], shallow=False)
    assert mismatch == [] and errors == []


def test_a_different_seed_gives_a_different_world(world, tmp_path):
    out, _ = world
    generate(tmp_path / "c", seed=6, n_train=40, n_eval=12, image_size=64, vocab_size=600)
    assert (out / "pretrain.jsonl").read_bytes() != (tmp_path / "c" / "pretrain.jsonl").read_bytes()


def test_manifest_lists_every_file_with_its_count(world):
    out, manifest = world
    for entry in manifest["files"].values():
        assert (out / entry["path"]).exists()
    assert manifest["files"]["pretrain"]["count"] == 40 and manifest["files"]["grounding_test"]["count"] == 12
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_training_files_load_and_batch_with_the_generated_tokenizer(world):
    out, _ = world
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert all(t in tok.get_vocab() for t in VLM_SPECIAL_TOKENS) and tok.pad_token == "<|endoftext|>"
    for name, fmt in (("pretrain.jsonl", "pretrain"), ("multitask.jsonl", "multitask"), ("sft.json", "qwen")):
        records, _ = load_records(out / name, fmt)
        assert records
        cfg = DataConfig(
            paths=[str(out / name)], format=fmt, image_size=32, max_len=512, num_workers=0, packing=True
        )
        batch = next(iter(build_dataloader(cfg, tok, num_image_tokens=4, batch_size=8)))
        assert batch["num_samples"] == 8
        assert (batch["input_ids"] == tok.convert_tokens_to_ids("<img>")).sum() == batch[
            "pixel_values"
        ].shape[0]


def test_preference_pairs_set_the_right_answer_against_a_plausible_wrong_one(world):
    out, manifest = world
    records, _ = load_records(out / "dpo.json")  # validated as preference pairs
    assert manifest["files"]["dpo"]["count"] == len(records) > 40  # several pairs per training image
    images = {r["conversations"][-1]["value"].split("<img>")[1].split("</img>")[0] for r in records}
    assert len(images) == 40 and all("/images/train/" in p for p in images)
    kinds = set()
    for r in records:
        question = r["conversations"][-1]["value"]
        chosen, rejected = r["chosen"], r["rejected"]
        if "<box>" in chosen:
            kinds.add("box")
            assert (
                parse_boxes(chosen) != parse_boxes(rejected)
                and chosen.split("<box>")[0] == rejected.split("<box>")[0]
            )
        elif "How many" in question:
            kinds.add("count")
            assert chosen != rejected and {chosen, rejected} <= {"1", "2", "3"}
        else:
            kinds.add("color")
            assert "color" in question and chosen != rejected and {chosen, rejected} <= set(COLORS)
    assert kinds == {"box", "count", "color"}
    # The demo's DPO stage trains on the count and colour pairs only: dpo.json without its box pairs, in order
    count_color, _ = load_records(out / "dpo_count_color.json")
    assert count_color == [r for r in records if "<box>" not in r["chosen"]]
    assert manifest["files"]["dpo_count_color"]["count"] == len(count_color) > 0
    held_out, _ = load_records(out / "dpo_test.json")
    assert manifest["files"]["dpo_test"]["count"] == len(held_out) > 12
    assert all("/images/eval/" in r["conversations"][-1]["value"] for r in held_out)
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    cfg = DataConfig(paths=[str(out / "dpo.json")], image_size=32, max_len=512, num_workers=0)
    batch = next(iter(build_dataloader(cfg, tok, num_image_tokens=4, batch_size=4, preference=True)))
    assert batch["num_pairs"] == 4 and batch["pixel_values"].shape[0] == 4  # each pair's picture once
    assert batch["image_index"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_a_picture_gives_a_pair_for_every_question_it_answers():
    """The count, the colour of each object its kind names alone (of two circles, "the circle" is ambiguous)
    and the box of each object: DPO sees every contrast of a picture, and the held-out pairs number several
    per image (a less noisy accuracy)."""
    import random

    def asked(things):
        pairs = preference_pairs(random.Random(0), "x.png", things, 64)
        questions = [
            p["conversations"][0]["value"].split("</img>")[1].strip().removesuffix(" Answer:") for p in pairs
        ]
        return sorted(
            q.replace("Find ", "")
            .replace(" and give its box.", "")
            .replace("<ref>", "")
            .replace("</ref><box>", "")
            for q in questions
        )

    shapes = [
        Thing("red", "circle", (0, 0, 20, 20)),
        Thing("blue", "circle", (40, 0, 60, 20)),
        Thing("green", "square", (0, 40, 20, 60)),
    ]
    assert asked(shapes) == [
        "How many shapes are there?",
        "What color is the square?",
        "the blue circle",
        "the green square",
        "the red circle",
    ]
    assert asked([Thing("red", "word", (5, 5, 30, 15), word="cat")]) == [
        "What color is the word?",
        "the word cat",
    ]


def test_the_preference_pairs_leave_every_other_file_as_it_was(world, tmp_path, monkeypatch):
    """Their own random stream: how many pairs a picture gives cannot change the other stages' data (the
    demo's figures for stages 1-3 stay valid when the preference pairs change)."""
    import data.synthetic

    out, _ = world
    monkeypatch.setattr(data.synthetic, "preference_pairs", lambda *args: [])
    generate(tmp_path / "b", seed=5, n_train=40, n_eval=12, image_size=64, vocab_size=600)
    files = [
        f
        for f in _all_files(out)
        if f.name not in ("dpo.json", "dpo_count_color.json", "dpo_test.json", "manifest.json")
    ]
    match, mismatch, errors = filecmp.cmpfiles(out, tmp_path / "b", [str(f) for f in files], shallow=False)
    assert len(match) == len(files) > 52 and mismatch == [] and errors == []


def test_eval_sets_follow_the_benchmark_formats(world):
    out, _ = world
    cap = json.loads((out / "caption_test.json").read_text())
    assert {i["id"] for i in cap["images"]} == {a["image_id"] for a in cap["annotations"]}
    vqa = [json.loads(line) for line in (out / "vqa_test.jsonl").read_text().splitlines()]
    assert set(vqa[0]) >= {"image", "question", "question_id", "answer"} and len(vqa[0]["answers"]) == 10
    ann = json.loads((out / "vqa_test_annotations.json").read_text())["annotations"]
    assert [a["question_id"] for a in ann] == [q["question_id"] for q in vqa]
    for line in (out / "grounding_test.jsonl").read_text().splitlines():
        g = json.loads(line)
        assert (out / g["image"]).exists() and g["sent"].startswith("the ")
        x1, y1, x2, y2 = g["bbox"]
        assert 0 <= x1 < x2 <= g["width"] and 0 <= y1 < y2 <= g["height"]
    for line in (out / "mc_test.jsonl").read_text().splitlines():
        m = json.loads(line)
        assert 0 <= m["answer"] < len(m["choices"]) and len(set(m["choices"])) == len(m["choices"])


def test_grounding_answers_use_the_box_convention(world):
    out, _ = world
    for line in (out / "multitask.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["task"] == "grounding":
            box = normalize_box(r["bbox"], r["width"], r["height"])
            assert all(0 <= c < 1000 for c in box)
        if r["task"] == "grounded_caption":
            assert parse_boxes(r["caption"])


def test_no_answer_is_rejected_more_often_than_it_is_right():
    """A wrong answer drawn near the right one (a count off by one) would make "2" the rejected answer of two
    count pairs in three: DPO would learn to avoid "2" without looking at the picture."""
    import collections
    import random

    rng = random.Random(0)
    chosen, rejected = collections.Counter(), collections.Counter()
    for i in range(3000):
        _, things = draw_shapes(rng, 64)
        for pair in preference_pairs(rng, f"{i}.png", things, 64):
            chosen[pair["chosen"]["value"]] += 1
            rejected[pair["rejected"]["value"]] += 1
    for answer in ("1", "2", "3", "red", "green", "blue", "yellow"):
        assert chosen[answer] > 100
        assert abs(rejected[answer] - chosen[answer]) < 0.25 * chosen[answer], (
            answer,
            chosen[answer],
            rejected[answer],
        )
