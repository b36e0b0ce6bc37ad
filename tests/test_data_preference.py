"""Preference pairs (DPO data): the record format (Qwen-VL and LLaVA style), named errors for bad records,
the shared prompt with labels only on the answer, truncation that never cuts the prompt, and pairs kept
together in packed rows or padded as adjacent rows."""

import json

import pytest
import torch
from PIL import Image

from data import stats
from data.chatml import render_chatml, render_preference_pair
from data.collate import Collator, pair_image_index, split_rows
from data.dataset import DataConfig, VLMDataset, build_dataloader
from data.formats import DataFormatError, load_records
from data.packing import pack, plan_rows
from data.sample import IGNORE_INDEX, TokenizedSample, truncate_pair
from models.tokens import IM_END

IMG_START, IMG_END = 1, 2  # marker ids for the truncation tests


def write_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (200, 30, 30)).save(path)


def qwen_pair(question="What color is it?", chosen="red", rejected="blue", image="imgs/a.png"):
    return {
        "id": "p0",
        "conversations": [{"from": "user", "value": f"Picture 1: <img>{image}</img>\n{question}"}],
        "chosen": {"from": "assistant", "value": chosen},
        "rejected": {"from": "assistant", "value": rejected},
    }


def test_qwen_and_llava_pairs_load_to_the_same_record(tmp_path):
    qwen = qwen_pair()
    llava = {
        "id": "p0",
        "image": "imgs/a.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat color is it?"}],
        "chosen": {"from": "gpt", "value": "red"},
        "rejected": {"from": "gpt", "value": "blue"},
    }
    (tmp_path / "qwen.json").write_text(json.dumps([qwen]))
    (tmp_path / "llava.jsonl").write_text(json.dumps(llava) + "\n")
    [from_qwen], _ = load_records(tmp_path / "qwen.json")
    [from_llava], _ = load_records(tmp_path / "llava.jsonl")
    image = tmp_path / "imgs" / "a.png"
    assert from_qwen == {
        "id": "p0",
        "chosen": "red",
        "rejected": "blue",
        "conversations": [{"from": "user", "value": f"Picture 1: <img>{image}</img>\nWhat color is it?"}],
    }
    assert from_llava == {
        **from_qwen,
        "conversations": [{"from": "user", "value": f"<img>{image}</img>\nWhat color is it?"}],
    }
    plain_strings = {**qwen, "chosen": "red", "rejected": "blue"}  # answers may be plain strings
    (tmp_path / "s.json").write_text(json.dumps([plain_strings]))
    assert load_records(tmp_path / "s.json")[0] == [from_qwen]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rejected": None}, r"record 0: preference record without 'rejected'"),
        (
            {"chosen": {"from": "assistant", "value": "blue"}},
            r"record 0: 'chosen' and 'rejected' are identical",
        ),
        ({"chosen": {"from": "user", "value": "red"}}, r"record 0: 'chosen' must come from 'assistant'"),
        (
            {"rejected": {"from": "assistant", "value": "  "}},
            r"record 0: 'rejected' must be a non-empty answer",
        ),
        (
            {"rejected": {"from": "assistant", "value": "<img>b.png</img> blue"}},
            r"record 0: 'rejected' contains an image",
        ),
        (
            {"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "yo"}]},
            r"record 0: .*'conversations' must end with the user turn",
        ),
        (
            {"rejected": {"from": "assistant", "value": "<box>(1,2),(3,1000)</box>"}},
            r"record 0: .*outside the integer range",
        ),
    ],
)
def test_bad_pairs_are_refused_naming_the_file_and_the_record(tmp_path, change, message):
    record = {**qwen_pair(), **change}
    record = {k: v for k, v in record.items() if v is not None}
    (tmp_path / "bad.json").write_text(json.dumps([record]))
    with pytest.raises(DataFormatError, match=rf"bad\.json {message}"):
        load_records(tmp_path / "bad.json")


def test_a_pair_shares_its_prompt_and_supervises_only_the_answer(tiny_tokenizer):
    history = [
        {"from": "user", "value": "Picture 1: <img>a.png</img>\nDescribe the image."},
        {"from": "assistant", "value": "A red car."},  # an earlier answer: prompt, not supervised
        {"from": "user", "value": "What color is the car?"},
    ]
    chosen, rejected = render_preference_pair(
        tiny_tokenizer, history, "The car is red.", "The bus is blue.", 4
    )
    prompt = render_chatml(tiny_tokenizer, history, 4)
    n = len(prompt)
    assert chosen.input_ids[:n] == rejected.input_ids[:n] == prompt.input_ids
    assert chosen.image_paths == rejected.image_paths == ["a.png"]
    for sample, answer in ((chosen, "The car is red."), (rejected, "The bus is blue.")):
        assert sample.labels[:n] == [IGNORE_INDEX] * n
        supervised = [t for t in sample.labels if t != IGNORE_INDEX]
        assert (
            tiny_tokenizer.decode(supervised) == answer + IM_END
        )  # the answer and its end of turn, nothing else


def sample(ids, answer_from):
    labels = [IGNORE_INDEX] * answer_from + ids[answer_from:]
    return TokenizedSample(list(ids), labels)


def test_truncation_cuts_answers_only_and_names_what_it_cannot_keep():
    # prompt: 3 text tokens, an image span <img> 9 9 </img>, 1 text token; then the answer from index 8
    prompt = [5, 6, 7, IMG_START, 9, 9, IMG_END, 8]
    chosen, rejected = sample(prompt + [20, 21, 22, 23], 8), sample(prompt + [30, 31], 8)
    c, r, truncated = truncate_pair(chosen, rejected, 10, IMG_START, IMG_END)
    assert (c.input_ids, r.input_ids, truncated) == (prompt + [20, 21], prompt + [30, 31], True)
    assert truncate_pair(chosen, rejected, 12, IMG_START, IMG_END)[2] is False
    with pytest.raises(
        ValueError, match="chosen sequence has 12 tokens and max_len=8 leaves nothing of the answer"
    ):
        truncate_pair(chosen, rejected, 8, IMG_START, IMG_END)
    with pytest.raises(ValueError, match="max_len=5 cuts through an image span of the prompt"):
        truncate_pair(chosen, rejected, 5, IMG_START, IMG_END)


def pair_item(first, n_chosen, n_rejected, n_images=1, index=0, size=8):
    def seq(start, n):
        ids = torch.arange(start, start + n)
        labels = ids.clone()
        labels[:2] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}

    return {
        "chosen": seq(first, n_chosen),
        "rejected": seq(first + 50, n_rejected),
        "truncated": False,
        "pixel_values": torch.full((n_images, 3, size, size), float(first)),
        "index": index,
    }


def test_packing_keeps_the_two_sequences_of_a_pair_in_one_row():
    assert plan_rows([3, 3, 3, 3], max_len=10) == [[0, 1, 2], [3]]  # plain samples: the 2nd pair would split
    assert plan_rows([3, 3, 3, 3], max_len=10, group=2) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match=r"samples 0-1 \(placed together\) has 12 tokens > max_len 10"):
        plan_rows([6, 6], max_len=10, group=2)
    items = [
        pair_item(100, 4, 3, index=7),
        pair_item(200, 5, 5, index=3),
        {"dropped": stats.DROPPED_BAD_IMAGE},
    ]
    batch = Collator(pad_id=0, image_size=8, row_len=12, packing=True)(items)
    # rows: [c0 r0], [c1 r1]: each sequence restarts its positions and is marked by its index
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], list(range(5)) * 2]
    assert batch["sequence_ids"].tolist() == [[0] * 4 + [1] * 3 + [-1] * 3, [2] * 5 + [3] * 5]
    assert batch["input_ids"][0, :7].tolist() == [100, 101, 102, 103, 150, 151, 152]
    assert (batch["num_pairs"], batch["num_samples"], batch["sample_lengths"]) == (2, 4, [4, 3, 5, 5])
    assert batch["pair_index"].tolist() == [7, 3]
    # each pair's images once; both of its sequences' image spans point at them
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [100.0, 200.0]
    assert batch["image_index"].tolist() == [0, 0, 1, 1]
    assert batch["_stats"][stats.SAMPLES] == 2 and batch["_stats"][stats.DROPPED_BAD_IMAGE] == 1


def test_without_packing_a_pair_is_two_adjacent_padded_rows():
    batch = Collator(pad_id=0, image_size=8, row_len=12, packing=False)(
        [pair_item(100, 4, 3), pair_item(200, 2, 5)]
    )
    assert batch["sequence_ids"].tolist() == [[0] * 4 + [-1], [1] * 3 + [-1] * 2, [2] * 2 + [-1] * 3, [3] * 5]
    assert batch["attention_mask"].sum(1).tolist() == [4, 3, 2, 5]
    assert batch["input_ids"][1, :3].tolist() == [150, 151, 152]


def test_plain_sft_batches_carry_no_sequence_ids():
    plain = pack([{"input_ids": torch.arange(3), "labels": torch.arange(3)}], max_len=8, pad_id=0)
    assert "sequence_ids" not in plain


def test_a_dpo_loader_takes_pairs_only_and_other_stages_refuse_them(tmp_path, tiny_tokenizer):
    write_image(tmp_path / "imgs" / "a.png")
    (tmp_path / "pairs.json").write_text(json.dumps([qwen_pair(), qwen_pair(chosen="dark red")]))
    (tmp_path / "chat.json").write_text(
        json.dumps(
            [{"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "yo"}]}]
        )
    )
    config = DataConfig(paths=[str(tmp_path / "pairs.json")], image_size=16, max_len=64, num_workers=0)
    with pytest.raises(DataFormatError, match=r"pairs\.json record 0: a preference pair .*train\.stage: dpo"):
        VLMDataset(config, tiny_tokenizer, 4)
    mixed = DataConfig(paths=[str(tmp_path / "pairs.json"), str(tmp_path / "chat.json")], num_workers=0)
    with pytest.raises(DataFormatError, match=r"chat\.json record 0: not a preference pair"):
        VLMDataset(mixed, tiny_tokenizer, 4, preference=True)
    batch = next(
        iter(build_dataloader(config, tiny_tokenizer, num_image_tokens=4, batch_size=2, preference=True))
    )
    assert batch["num_pairs"] == 2 and batch["pixel_values"].shape == (2, 3, 16, 16)  # one image per pair
    assert batch["image_index"].tolist() == [0, 0, 1, 1]
    assert sorted(batch["pair_index"].tolist()) == [0, 1]


def test_a_max_len_inside_the_prompts_image_is_an_error_naming_the_record(tmp_path, tiny_tokenizer):
    write_image(tmp_path / "imgs" / "a.png")
    (tmp_path / "pairs.json").write_text(json.dumps([qwen_pair()]))
    [record], _ = load_records(tmp_path / "pairs.json")
    chosen, _ = render_preference_pair(tiny_tokenizer, record["conversations"], "red", "blue", 16)
    inside_image = chosen.input_ids.index(tiny_tokenizer.convert_tokens_to_ids("<img>")) + 5
    config = DataConfig(
        paths=[str(tmp_path / "pairs.json")], image_size=16, max_len=inside_image, num_workers=0
    )
    dataset = VLMDataset(config, tiny_tokenizer, 16, preference=True)
    with pytest.raises(
        DataFormatError,
        match=rf"pairs\.json record 0: the chosen sequence has {len(chosen)} tokens "
        rf"and max_len={inside_image} cuts through an image span",
    ):
        dataset[0]


def test_a_pairs_images_are_indexed_once_for_both_sequences():
    """Spans come chosen then rejected, pair by pair: pairs of 2, 0 and 1 images."""
    assert pair_image_index([2, 0, 1]).tolist() == [0, 1, 0, 1, 2, 2]
    assert pair_image_index([]).tolist() == []


def test_splitting_a_batch_of_pairs_gives_each_forward_its_pairs_images():
    """split_rows cuts between pairs; each part holds only its pairs' images and indexes them from 0."""
    image_start = 7

    def with_image_spans(item, n):  # n image-start tokens in each sequence, so split_rows counts spans
        for key in ("chosen", "rejected"):
            item[key]["input_ids"][2 : 2 + n] = image_start
        return item

    items = [
        with_image_spans(pair_item(100, 4, 4, n_images=2), 2),
        with_image_spans(pair_item(200, 4, 4, n_images=0), 0),
        with_image_spans(pair_item(300, 4, 4, n_images=1), 1),
    ]
    batch = Collator(pad_id=0, image_size=8, row_len=8, packing=True)(items)
    assert batch["image_index"].tolist() == [0, 1, 0, 1, 2, 2]
    parts = split_rows(batch, max_tokens=8, image_start_id=image_start)  # one row (one pair) per forward
    assert [p["pixel_values"][:, 0, 0, 0].tolist() for p in parts] == [[100.0, 100.0], [], [300.0]]
    assert [p["image_index"].tolist() for p in parts] == [[0, 1, 0, 1], [], [0, 0]]
