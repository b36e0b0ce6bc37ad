"""Specification of data.hf_encode: our conversations in a HF VLM family's own tokens.

The ids must equal what the family's own processor makes of the same conversation
(``processor.apply_chat_template`` + ``processor(text, images)``), token for token, with each image's
placeholder sized by its own grid; labels cover exactly the assistant turns' content and ``<|im_end|>``.
The processors are the families' own, rebuilt offline (models.families.processor) over the tiny vocabulary of
tests/conftest.py; one test pins the ids of the released vocabulary.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from data.formats import normalize_record
from data.hf_encode import encode_conversation, encode_record, to_messages, truncate_family_sample
from data.sample import IGNORE_INDEX
from models.families.processor import build_family_processor
from models.families.specs import FAMILIES

# A small pixel budget so that every test image is resized by the processor (down or up).
MIN_PIXELS, MAX_PIXELS = 56 * 56, 160 * 160


@pytest.fixture(scope="module", params=list(FAMILIES))
def processor(request, tiny_tiktoken):
    return build_family_processor(
        FAMILIES[request.param], tiny_tiktoken, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, tuple[int, int]]:
    """Three images of different sizes and aspect ratios: {path: (width, height)}."""
    folder = tmp_path_factory.mktemp("images")
    sizes = {"wide.png": (300, 120), "tall.png": (90, 200), "small.png": (40, 30)}
    out = {}
    for i, (name, size) in enumerate(sizes.items()):
        Image.new("RGB", size, (40 * i, 200 - 50 * i, 90)).save(folder / name)
        out[str(folder / name)] = size
    return out


def reference_encoding(processor, conversation):
    """The family's own way: chat messages with images -> apply_chat_template -> processor(text, images)."""
    messages, paths = to_messages(conversation)
    text = processor.apply_chat_template(messages, tokenize=False)
    images = [Image.open(p).convert("RGB") for p in paths]
    return processor(text=[text], images=images or None, return_tensors="pt")


def conversations(paths: list[str]) -> dict[str, list[dict]]:
    wide, tall, small = paths
    return {
        "several turns, several images, system prompt": [
            {"from": "system", "value": "You are a careful describer of pictures."},
            {
                "from": "user",
                "value": f"Picture 1: <img>{wide}</img>\nPicture 2: <img>{tall}</img>\nCompare them.",
            },
            {"from": "assistant", "value": "The first is wide, the second tall."},
            {"from": "user", "value": f"And this one? <img>{small}</img>"},
            {"from": "assistant", "value": "It is small: 40 by 30 pixels.\nThat is all."},
        ],
        "text only": [
            {"from": "user", "value": "What is 12 + 30?"},
            {"from": "assistant", "value": "42"},
            {"from": "user", "value": "  and doubled?\n"},
            {"from": "assistant", "value": "\n84 "},
        ],
        "image after text, default system prompt": [
            {"from": "user", "value": f"Describe <img>{tall}</img> briefly."},
            {"from": "assistant", "value": "A tall picture."},
        ],
    }


def sizes_of(images, conversation):
    return [images[p] for p in to_messages(conversation)[1]]


@pytest.mark.parametrize(
    "case",
    ["several turns, several images, system prompt", "text only", "image after text, default system prompt"],
)
def test_ids_equal_the_family_processor(processor, images, case):
    conversation = conversations(list(images))[case]
    sample = encode_conversation(processor, conversation, sizes_of(images, conversation))
    expected = reference_encoding(processor, conversation)
    assert sample.input_ids == expected["input_ids"][0].tolist()
    if sample.image_paths:
        assert sample.image_grid_thw == [tuple(g) for g in expected["image_grid_thw"].tolist()]


def test_each_image_span_is_sized_by_its_own_grid(processor, images):
    conversation = conversations(list(images))["several turns, several images, system prompt"]
    sample = encode_conversation(processor, conversation, sizes_of(images, conversation))
    tok = processor.tokenizer
    start, pad, end = (
        tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
    )
    ids = sample.input_ids
    runs = [ids.index(end, i) - i - 1 for i, t in enumerate(ids) if t == start]
    assert runs == [t * h * w // 4 for t, h, w in sample.image_grid_thw]
    assert len(set(runs)) == 3  # three sizes, three different spans
    assert sum(runs) == ids.count(pad)


def supervised_runs(sample) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("case", ["several turns, several images, system prompt", "text only"])
def test_labels_are_exactly_the_assistant_turns_and_their_end_marker(processor, images, case):
    conversation = conversations(list(images))[case]
    sample = encode_conversation(processor, conversation, sizes_of(images, conversation))
    answers = [t["value"] for t in conversation if t["from"] == "assistant"]
    decoded = [processor.tokenizer.decode(run) for run in supervised_runs(sample)]
    # "\n84 " opens with a newline that BPE joins to the prompt's "\n": that piece starts in the prompt
    # and stays unsupervised (module docstring), so the supervised text begins after it.
    expected = [a + "<|im_end|>" for a in answers]
    if case == "text only":
        expected[-1] = expected[-1].lstrip("\n")
    assert decoded == expected


def test_records_of_every_format_encode_alike(processor, images, tmp_path):
    """A LLaVA record (data.formats converts it) encodes as its Qwen-VL JSON twin."""
    wide = next(iter(images))
    llava = normalize_record(
        {
            "image": wide,
            "conversations": [
                {"from": "human", "value": "<image>\nWhat shape?"},
                {"from": "gpt", "value": "Wide."},
            ],
        },
        "auto",
        tmp_path,
    )
    qwen = normalize_record(
        {
            "conversations": [
                {"from": "user", "value": f"<img>{wide}</img>\nWhat shape?"},
                {"from": "assistant", "value": "Wide."},
            ]
        },
        "auto",
        tmp_path,
    )
    a, pixels = encode_record(processor, llava)
    b, _ = encode_record(processor, qwen)
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
    expected = reference_encoding(processor, qwen["conversations"])
    assert a.input_ids == expected["input_ids"][0].tolist()
    assert torch.equal(pixels["pixel_values"], expected["pixel_values"])


def test_the_released_qwen2_vl_ids(released_qwen_tiktoken):
    """reference 1.2.4: a 56x84 image (grid 1x4x6, 6 pads) in Qwen2-VL's template,
    ids as transformers gives."""
    processor = build_family_processor(FAMILIES["qwen2_vl"], released_qwen_tiktoken)
    conversation = [
        {"from": "user", "value": "<img>x.png</img>Describe this image."},
        {"from": "assistant", "value": "A black rectangle."},
    ]
    sample = encode_conversation(processor, conversation, [(84, 56)])
    assert sample.input_ids == [
        151644,
        8948,
        198,
        2610,
        525,
        264,
        10950,
        17847,
        13,
        151645,
        198,
        151644,
        872,
        198,
        151652,
        *[151655] * 6,
        151653,
        74785,
        419,
        2168,
        13,
        151645,
        198,
        151644,
        77091,
        198,
        32,
        3691,
        22756,
        13,
        151645,
        198,
    ]
    assert [t for t, lab in zip(sample.input_ids, sample.labels) if lab != IGNORE_INDEX] == [
        32,
        3691,
        22756,
        13,
        151645,
    ]


def test_bad_conversations_are_refused(processor):
    with pytest.raises(ValueError, match="images are allowed in user turns only"):
        to_messages([{"from": "user", "value": "hi"}, {"from": "assistant", "value": "<img>a.png</img>"}])
    with pytest.raises(ValueError, match="1 images in the conversation but 0 image sizes"):
        encode_conversation(
            processor,
            [{"from": "user", "value": "<img>a.png</img>"}, {"from": "assistant", "value": "ok"}],
            [],
        )


def test_truncation_never_cuts_an_image_span_and_keeps_the_grids_of_the_images_it_keeps(processor, images):
    conversation = conversations(list(images))["several turns, several images, system prompt"]
    sample = encode_conversation(processor, conversation, sizes_of(images, conversation))
    start, end = (
        processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>")
    )
    second_image = [i for i, t in enumerate(sample.input_ids) if t == start][1]
    cut = truncate_family_sample(sample, second_image + 3, start, end)  # inside the second span
    assert cut is None  # everything supervised came after that image
    last_image = [i for i, t in enumerate(sample.input_ids) if t == start][2]
    cut = truncate_family_sample(sample, last_image + 2, start, end)
    assert cut.input_ids == sample.input_ids[:last_image]
    assert cut.image_paths == sample.image_paths[:2] and cut.image_grid_thw == sample.image_grid_thw[:2]
    assert truncate_family_sample(sample, len(sample), start, end) is sample


def test_a_long_conversation_cut_at_max_len_renders_only_the_turns_before_the_cut(processor, images):
    """Each turn's span costs a render of the conversation up to it (quadratic in turns: 1.3 s for a
    600-turn record). With ``max_len``, the turns after the cut are not rendered, and the labels up to the cut
    are exactly those of the whole conversation's."""
    wide = next(iter(images))
    conversation = [{"from": "user", "value": f"<img>{wide}</img>\nWhat is this?"}]
    for i in range(200):
        conversation += [
            {"from": "assistant", "value": f"Answer number {i}."},
            {"from": "user", "value": f"And question {i + 1}?"},
        ]
    conversation += [{"from": "assistant", "value": "The last answer."}]
    sizes = sizes_of(images, conversation)
    whole = encode_conversation(processor, conversation, sizes)
    renders = []
    original = processor.apply_chat_template
    processor.apply_chat_template = lambda *a, **k: renders.append(a) or original(*a, **k)
    try:
        cut = encode_conversation(processor, conversation, sizes, max_len=300)
    finally:
        del processor.apply_chat_template  # the class's method again
    assert cut.input_ids == whole.input_ids
    assert cut.labels[:300] == whole.labels[:300]
    assert any(label != IGNORE_INDEX for label in cut.labels[:300])
    assert all(label == IGNORE_INDEX for label in cut.labels[310:])  # past the cut: not looked for
    assert len(renders) < 2 * 60  # the whole text, then two renders for each turn before the cut (~35)
