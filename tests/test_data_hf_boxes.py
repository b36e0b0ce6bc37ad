"""Specification of data.hf_boxes: our <ref>/<box> text (0-1000 of the original image) in each family's box
convention and back, for training data in and answers out, on images the family's processor resizes.

Conventions from the families' documentation (reference 5): Qwen2-VL box tokens in 0-1000, Qwen2.5-VL JSON in
absolute pixels of the resized image, Qwen3-VL JSON in 0-1000.
"""

from __future__ import annotations

import random

import pytest

from data.hf_boxes import (
    ImageGeometry,
    boxes_from_family,
    boxes_to_family,
    family_answer_to_qwen_vl,
)
from data.hf_encode import encode_conversation, resized_size
from data.sample import IGNORE_INDEX
from data.text import normalize_box
from models.families.processor import build_family_processor
from models.families.specs import FAMILIES

# The official notebook's example (QwenLM qwen-vl-finetune/tools/process_bbox.ipynb, reference 5.1/5.2): the
# pixel box [146, 137, 615, 415] on a 640x428 (w x h) image.
NOTEBOOK_BOX, NOTEBOOK_SIZE = (146, 137, 615, 415), (640, 428)


def test_qwen2_vl_and_qwen3_vl_carry_thousandths_as_the_notebook_computes_them():
    """Notebook: [228, 320, 961, 970] (it rounds; we store floor(x * 1000 / w): each within 1)."""
    ours = normalize_box(NOTEBOOK_BOX, *NOTEBOOK_SIZE)
    text = boxes_to_family(
        f"<ref>house</ref><box>({ours[0]},{ours[1]}),({ours[2]},{ours[3]})</box>", "box_tokens_1000"
    )
    assert text == ("<|object_ref_start|>house<|object_ref_end|><|box_start|>(228,320),(960,969)<|box_end|>")
    assert all(abs(a - b) <= 1 for a, b in zip((228, 320, 960, 969), (228, 320, 961, 970)))
    assert boxes_to_family("<box>(228,320),(960,969)</box>", "json_1000") == (
        '```json\n[\n\t{"bbox_2d": [228, 320, 960, 969]}\n]\n```'
    )


def test_qwen2_5_vl_uses_pixels_of_the_resized_image_as_the_notebook(tiny_tiktoken):
    """Notebook, with its max_pixels 14*14*4*1280: the image is resized to 644x420 and the box becomes
    [147, 134, 619, 407]; ours (from the stored thousandths) is within one resized pixel."""
    processor = build_family_processor(
        FAMILIES["qwen2_5_vl"], tiny_tiktoken, min_pixels=56 * 56, max_pixels=14 * 14 * 4 * 1280
    )
    assert resized_size(processor, *NOTEBOOK_SIZE) == (644, 420)
    geometry = ImageGeometry(*NOTEBOOK_SIZE, 644, 420)
    x1, y1, x2, y2 = normalize_box(NOTEBOOK_BOX, *NOTEBOOK_SIZE)
    text = boxes_to_family(f"<ref>house</ref><box>({x1},{y1}),({x2},{y2})</box>", "json_absolute", geometry)
    [(label, _)] = boxes_from_family(text, "json_absolute", geometry)
    coords = [int(c) for c in text.split("[", 2)[2].split("]")[0].split(",")]
    assert label == "house"
    assert all(abs(a - b) <= 1 for a, b in zip(coords, (147, 134, 619, 407))), coords


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("size", [(640, 428), (1920, 1080), (97, 301), (33, 20)])
def test_round_trip_through_the_family_convention_on_resized_images(family, size, tiny_tiktoken):
    """Our box -> the family's text -> our box, for images the processor shrinks or enlarges. Exact for
    the relative conventions and for resized sides of 1000 px or more; otherwise within 1000 / side + 1."""
    spec = FAMILIES[family]
    processor = build_family_processor(spec, tiny_tiktoken, min_pixels=64 * 64, max_pixels=1280 * 1280)
    resized = resized_size(processor, *size)
    assert resized != size  # the processor resized it
    geometry = ImageGeometry(*size, *resized)
    rng = random.Random(0)
    for _ in range(200):
        xs, ys = sorted(rng.randrange(1000) for _ in range(2)), sorted(rng.randrange(1000) for _ in range(2))
        box = (xs[0], ys[0], xs[1], ys[1])
        ours = f"<ref>thing</ref><box>({box[0]},{box[1]}),({box[2]},{box[3]})</box>"
        family_text = boxes_to_family(ours, spec.box_convention, geometry)
        [(label, back)] = boxes_from_family(family_text, spec.box_convention, geometry)
        assert label == "thing"
        if spec.box_convention != "json_absolute":
            assert back == box
            continue
        sides = resized * 2
        for got, want, side in zip(back, box, sides):
            assert abs(got - want) <= (0 if side >= 1000 else 1000 / side + 1), (box, back, resized)


def test_answers_out_in_each_convention():
    geometry = ImageGeometry(width=800, height=600, resized_width=812, resized_height=588)
    qwen2_vl = (
        "<|object_ref_start|>a dog<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|>"
        "<|box_start|>(1000,0),(900,50)<|box_end|> and more"
    )
    assert boxes_from_family(qwen2_vl, "box_tokens_1000") == [
        ("a dog", (100, 200, 300, 400)),
        ("a dog", (900, 0, 999, 50)),
    ]
    qwen2_5_vl = (
        '```json\n[\n\t{"label": "cat", "bbox_2d": [82.5, 59, 406, 294]},\n'
        '\t{"bbox_2d": [0, 0, 900, 700], "label": "all \\"of\\" it"}\n]\n```'
    )
    assert boxes_from_family(qwen2_5_vl, "json_absolute", geometry) == [
        ("cat", (101, 100, 500, 500)),
        ('all "of" it', (0, 0, 999, 999)),
    ]
    assert family_answer_to_qwen_vl(qwen2_5_vl, "json_absolute", geometry) == (
        '<ref>cat</ref><box>(101,100),(500,500)</box><ref>all "of" it</ref><box>(0,0),(999,999)</box>'
    )
    assert boxes_from_family('{"bbox_2d": [10, 20, 30, 40]}', "json_1000") == [(None, (10, 20, 30, 40))]
    assert family_answer_to_qwen_vl("No box here.", "json_1000") == "No box here."


def test_training_text_in_each_convention():
    geometry = ImageGeometry(width=1000, height=500, resized_width=2000, resized_height=1000)
    text = "A <ref>cat</ref><box>(0,0),(500,500)</box> near a <ref>dog</ref>."
    assert boxes_to_family(text, "box_tokens_1000") == (
        "A <|object_ref_start|>cat<|object_ref_end|><|box_start|>(0,0),(500,500)<|box_end|> near a "
        "<|object_ref_start|>dog<|object_ref_end|>."
    )
    assert boxes_to_family(text, "json_absolute", geometry) == (
        'A {"bbox_2d": [1, 0, 1001, 500], "label": "cat"} near a dog.'
    )
    prompt = "Picture 1: <img>a.png</img>\n<ref>the red circle</ref><box>"
    assert boxes_to_family(prompt, "json_1000") == (
        "Picture 1: <img>a.png</img>\nLocate the red circle, output its bbox coordinates using JSON format."
    )
    assert boxes_to_family(prompt, "box_tokens_1000").endswith(
        "<|object_ref_start|>the red circle<|object_ref_end|>"
    )


def test_what_no_family_can_say_is_refused():
    with pytest.raises(ValueError, match="OCR quads"):
        boxes_to_family("<ref>STOP</ref><quad>(1,1),(2,1),(2,2),(1,2)</quad>", "json_1000")
    with pytest.raises(ValueError, match="a box before any image"):
        boxes_to_family("<box>(1,1),(2,2)</box>", "json_absolute")
    with pytest.raises(ValueError, match="unknown box convention"):
        boxes_to_family("x", "pixels")


def test_grounding_conversations_train_in_the_family_convention(tmp_path, tiny_tiktoken):
    """data.hf_encode rewrites boxes against the image before them; the answer is supervised as rewritten."""
    spec = FAMILIES["qwen2_5_vl"]
    processor = build_family_processor(spec, tiny_tiktoken, min_pixels=56 * 56, max_pixels=320 * 320)
    conversation = [
        {"from": "user", "value": "<img>a.png</img>\n<ref>the square</ref><box>"},
        {"from": "assistant", "value": "<ref>the square</ref><box>(100,200),(500,600)</box>"},
    ]
    size = (400, 300)
    sample = encode_conversation(processor, conversation, [size], spec.box_convention)
    width, height = resized_size(processor, *size)
    x1, y1, x2, y2 = (
        round((c + 0.5) * side / 1000)
        for c, side in zip((100, 200, 500, 600), (width, height, width, height))
    )
    answer = [t for t, lab in zip(sample.input_ids, sample.labels) if lab != IGNORE_INDEX]
    assert processor.tokenizer.decode(answer) == (
        f'```json\n[\n\t{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], "label": "the square"}}\n]\n```<|im_end|>'
    )
    prompt = processor.tokenizer.decode(sample.input_ids[: len(sample.input_ids) - len(answer)])
    assert "Locate the square, output its bbox coordinates using JSON format." in prompt
