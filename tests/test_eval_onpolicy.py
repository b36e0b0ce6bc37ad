"""On-policy preference pairs (eval_mm/onpolicy.py): each pair's question is put to the model, and where its
answer is wrong it becomes the rejected answer; where it is right the pair is dropped or kept as it was."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.formats import load_records
from eval_mm.onpolicy import generate_for_pairs, is_right, onpolicy_pairs, relocate_images, relocate_record

REPO = Path(__file__).resolve().parents[1]
BOX = "<ref>the red circle</ref><box>(100,100),(400,400)</box>"


def pair(question: str, chosen: str, rejected: str, image: str = "images/train/000000.png") -> dict:
    return {
        "id": question,
        "conversations": [{"from": "user", "value": f"<img>{image}</img>{question}"}],
        "chosen": {"from": "assistant", "value": chosen},
        "rejected": {"from": "assistant", "value": rejected},
    }


def test_a_box_answer_is_right_by_iou_with_the_chosen_box_not_by_its_digits():
    assert is_right("<ref>the red circle</ref><box>(110,100),(400,410)</box>", BOX)  # IoU 0.94
    assert not is_right("<ref>the red circle</ref><box>(500,500),(900,900)</box>", BOX)  # another quadrant
    assert not is_right("<ref>the red circle</ref><box>(100,100)", BOX)  # no whole box: unparsable is wrong
    assert is_right("<box>(100,100),(300,300)</box>", BOX, iou=0.4) and not is_right(
        "<box>(100,100),(300,300)</box>", BOX, iou=0.5
    )  # IoU 0.44: the threshold decides


def test_a_text_answer_is_right_up_to_case_white_space_and_a_final_full_stop():
    assert is_right(" Red.", "red")
    assert is_right("a red circle.", "a red circle")
    assert not is_right("blue", "red") and not is_right("2", "3")


def test_a_wrong_answer_becomes_the_rejected_one_and_pairs_answered_right_are_dropped():
    raw = [
        pair("What color is the circle?", "red", "blue"),
        pair("How many shapes are there?", "2", "3"),
        pair(
            "Find the red circle and give its box.",
            BOX,
            "<ref>the red circle</ref><box>(500,500),(900,900)</box>",
        ),
    ]
    answers = ["green", "2", "<ref>the red circle</ref><box>(0,500),(300,900)</box>"]
    out, counts = onpolicy_pairs(raw, answers)
    assert [r["id"] for r in out] == ["What color is the circle?", "Find the red circle and give its box."]
    assert [r["rejected"]["value"] for r in out] == ["green", answers[2]]
    assert all(r["rejected_source"] == "model" for r in out)
    assert [r["chosen"] for r in out] == [raw[0]["chosen"], raw[2]["chosen"]]  # the truth is kept
    assert counts == {("text", "wrong"): 1, ("text", "right"): 1, ("box", "wrong"): 1}
    assert raw[0]["rejected"]["value"] == "blue"  # the input records are not modified


def test_keep_leaves_the_pairs_the_model_answers_right_as_they_were():
    raw = [pair("What color is the circle?", "red", "blue"), pair("How many shapes are there?", "2", "3")]
    out, _ = onpolicy_pairs(raw, ["green", "2"], right="keep")
    assert out[1] == raw[1] and out[0]["rejected"]["value"] == "green"


def test_an_answer_that_cannot_be_rejected_leaves_the_pair_as_answered_right():
    raw = [
        pair("What color is the circle?", "red", "blue"),
        pair(
            "Find the red circle and give its box.",
            BOX,
            "<ref>the red circle</ref><box>(500,500),(900,900)</box>",
        ),
    ]
    # empty; a box the training loader refuses (coordinates past 999)
    out, counts = onpolicy_pairs(
        raw, ["", "<ref>the red circle</ref><box>(500,500),(1200,900)</box>"], right="keep"
    )
    assert out == raw and not any("rejected_source" in r for r in out)
    assert counts == {("text", "unusable"): 1, ("box", "unusable"): 1}


def test_image_paths_are_rewritten_relative_to_the_output_folder(tmp_path):
    world, out = tmp_path / "world", tmp_path / "runs" / "pairs"
    text = "Picture 1: <img>images/train/000001.png</img>\nWhat color is the circle?"
    assert relocate_images(text, world, world) == text
    assert (
        relocate_images(text, world, out)
        == "Picture 1: <img>../../world/images/train/000001.png</img>\nWhat color is the circle?"
    )
    assert relocate_images("<img>/abs/a.png</img>", world, out) == "<img>/abs/a.png</img>"
    llava = {"image": "images/a.png", "conversations": [{"from": "human", "value": "<image>\nWhat color?"}]}
    relocate_record(llava, world, out)
    assert llava["image"] == "../../world/images/a.png"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from data.synthetic import generate

    root = tmp_path_factory.mktemp("onpolicy_world")
    generate(root, seed=0, n_train=3, n_eval=1, image_size=56, vocab_size=300)
    return root


@pytest.fixture(scope="module")
def checkpoint(world, tmp_path_factory):
    from models import build_vlm, load_tokenizer, presets

    tokenizer = load_tokenizer(world / "tokenizer")
    torch.manual_seed(0)
    model = build_vlm(presets.tiny(vocab_size=len(tokenizer)), tokenizer=tokenizer).eval()
    path = tmp_path_factory.mktemp("onpolicy_model")
    model.save_pretrained(path)
    return path


def test_the_answers_are_the_models_greedy_chatml_answers_with_their_grounding_tags(world, checkpoint):
    from data.images import load_image
    from data.text import tokenize_plain
    from eval_mm.inference import generate_tokens, left_pad, pad_token_id, stop_token_ids
    from eval_mm.prompts import encode_prompt
    from models.loading import load_pretrained

    model, tokenizer = load_pretrained(checkpoint)
    records, _ = load_records(world / "dpo.json")
    answers = generate_for_pairs(model, tokenizer, records, batch_size=4)
    assert len(answers) == len(records)
    stops = stop_token_ids(tokenizer, "chatml")
    longest = (
        max(len(tokenize_plain(tokenizer, r["chosen"])) for r in records) + 8
    )  # the tool's default length
    # One by one, through eval_mm's own prompt encoding: batching and padding change nothing.
    for record, answer in list(zip(records, answers, strict=True))[:3]:
        ids, paths = encode_prompt(
            tokenizer, record["conversations"][0]["value"], model.config.num_image_tokens, "chatml"
        )
        pixels = torch.stack([load_image(p, model.config.vision.image_size) for p in paths])
        input_ids, mask = left_pad([ids], pad_token_id(tokenizer))
        tokens = generate_tokens(
            model, input_ids, mask, pixels, max_new_tokens=longest, min_new_tokens=1, stop_ids=stops
        )[0].tolist()
        tokens = tokens[: next((k for k, t in enumerate(tokens) if t in stops), len(tokens))]
        assert answer == tokenizer.decode(tokens, skip_special_tokens=False).strip()


def test_decoding_keeps_the_grounding_tags_and_stops_at_the_end_of_the_turn(tiny_tokenizer):
    from eval_mm.inference import stop_token_ids
    from eval_mm.onpolicy import decode_answer

    stops = stop_token_ids(tiny_tokenizer, "chatml")
    text = "<ref>the red circle</ref><box>(1,2),(3,4)</box>"
    tokens = tiny_tokenizer.encode(text, add_special_tokens=False) + [
        stops[1],
        *tiny_tokenizer.encode("more"),
    ]
    assert decode_answer(tiny_tokenizer, tokens, stops) == text


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "eval_mm.onpolicy", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"},
    )


def test_the_cli_writes_pairs_the_trainer_reads(world, checkpoint, tmp_path):
    out = tmp_path / "pairs" / "dpo_onpolicy.json"
    result = run_cli(
        "--checkpoint",
        str(checkpoint),
        "--pairs",
        str(world / "dpo.json"),
        "--out",
        str(out),
        "--right",
        "keep",
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    written = json.loads(out.read_text())
    source = json.loads((world / "dpo.json").read_text())
    assert [r["id"] for r in written] == [r["id"] for r in source]  # keep: every pair, in order
    records, _ = load_records(out)  # valid training data, its images found from the new folder
    images = [p for r in records for p in re.findall(r"<img>(.*?)</img>", r["conversations"][0]["value"])]
    assert images and all(Path(p).is_file() for p in images)
    assert "answers:" in result.stdout and f"wrote {len(source)} pairs" in result.stdout


def test_a_record_that_is_not_a_pair_is_named_in_one_error_line(world, checkpoint, tmp_path):
    bad = tmp_path / "mixed.json"
    records = json.loads((world / "dpo.json").read_text())[:1]
    records.append(
        {"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "hello"}]}
    )
    bad.write_text(json.dumps(records))
    result = run_cli("--checkpoint", str(checkpoint), "--pairs", str(bad), "--out", str(tmp_path / "o.json"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert (
        str(bad) in result.stderr and "record 1" in result.stderr and "not a preference pair" in result.stderr
    )
