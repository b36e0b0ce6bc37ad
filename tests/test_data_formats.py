"""data.formats + data.dataset: user files -> validated records -> samples; every bad-input case names the
file and the record."""

import json

import pytest
import torch
from PIL import Image

from data import stats
from data.dataset import DataConfig, build_dataloader
from data.formats import DataFormatError, empty_answer_turn, llava_to_qwen, load_pretrain_pairs, load_records
from data.image_files import ImageLoadError
from data.images import CLIP_MEAN, CLIP_STD, load_image
from data.templates import render_task, task_prompt_and_target

N_IMG = 4


def write_image(path, size=(20, 10), color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def chat(user, answer="ok"):
    return {"conversations": [{"from": "user", "value": user}, {"from": "assistant", "value": answer}]}


def test_load_image_is_rgb_squashed_and_clip_normalised(tmp_path):
    write_image(tmp_path / "red.png", size=(30, 10), color=(255, 0, 0))
    x = load_image(tmp_path / "red.png", 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    expected = [
        (1.0 - CLIP_MEAN[0]) / CLIP_STD[0],
        (0.0 - CLIP_MEAN[1]) / CLIP_STD[1],
        (0.0 - CLIP_MEAN[2]) / CLIP_STD[2],
    ]
    assert torch.allclose(x.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)


def test_missing_and_corrupt_images_name_the_file_and_the_record(tmp_path):
    with pytest.raises(ImageLoadError, match=r"not found: .*nope\.png \(referenced by t\.json record 3\)"):
        load_image(tmp_path / "nope.png", 16, where="t.json record 3")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(ImageLoadError, match=r"cannot decode image .*bad\.png"):
        load_image(tmp_path / "bad.png", 16)


def test_qwen_json_list_loads_with_paths_relative_to_the_data_file(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.json").write_text(json.dumps([chat("Picture 1: <img>imgs/a.png</img>\nwhat?")]))
    records, wheres = load_records(tmp_path / "d" / "train.json")
    assert (
        records[0]["conversations"][0]["value"]
        == f"Picture 1: <img>{tmp_path / 'd' / 'imgs' / 'a.png'}</img>\nwhat?"
    )
    assert wheres == [f"{tmp_path / 'd' / 'train.json'} record 0"]
    records, _ = load_records(tmp_path / "d" / "train.json", image_root="/data/root")
    assert "<img>/data/root/imgs/a.png</img>" in records[0]["conversations"][0]["value"]


def test_llava_records_are_converted_on_load():
    rec = {
        "id": 7,
        "image": "a.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A cat."},
        ],
    }
    assert llava_to_qwen(rec) == {
        "id": 7,
        "conversations": [
            {"from": "user", "value": "<img>a.jpg</img>\nWhat is it?"},
            {"from": "assistant", "value": "A cat."},
        ],
    }
    no_placeholder = {
        "image": "a.jpg",
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}],
    }
    assert llava_to_qwen(no_placeholder)["conversations"][0]["value"] == "<img>a.jpg</img>\nHi"


def test_llava_file_is_detected_automatically(tmp_path):
    rec = {
        "image": "a.jpg",
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}],
    }
    (tmp_path / "l.jsonl").write_text(json.dumps(rec) + "\n")
    records, wheres = load_records(tmp_path / "l.jsonl")
    assert records[0]["conversations"][0]["from"] == "user" and wheres == [f"{tmp_path / 'l.jsonl'} line 1"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.json", '[{"conversations": []}, ', r"bad\.json: malformed JSON at line 1"),
        ("bad.jsonl", json.dumps(chat("a")) + "\n{not json}\n", r"bad\.jsonl line 2: malformed JSON"),
        (
            "empty.json",
            json.dumps([chat("a"), {"conversations": []}]),
            r"empty\.json record 1: empty conversation",
        ),
        (
            "role.json",
            json.dumps(
                [{"conversations": [{"from": "user", "value": "a"}, {"from": "robot", "value": "b"}]}]
            ),
            r"role\.json record 0: turn 1 has role 'robot'",
        ),
        ("img.json", json.dumps([chat("look <img>a.png")]), r"img\.json record 0: unclosed <img>"),
        (
            "box.jsonl",
            json.dumps(chat("where?", "<ref>x</ref><box>(0,0),(1000,10)</box>")) + "\n",
            r"box\.jsonl line 1: box coordinate 1000 outside",
        ),
        (
            "task.jsonl",
            json.dumps({"task": "grounding", "image": "a.png", "ref": "x", "box": [0, 0, 5, 1200]}) + "\n",
            r"task\.jsonl line 1: box coordinate 1200 outside",
        ),
        (
            "unknown.jsonl",
            json.dumps({"task": "dance", "image": "a.png"}) + "\n",
            r"unknown\.jsonl line 1: unknown task",
        ),
        # record shapes: a wrong type or a missing key is named, never an AttributeError or KeyError
        (
            "value.json",
            json.dumps(
                [
                    {
                        "image": "a.png",
                        "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": 5}],
                    }
                ]
            ),
            r"value\.json record 0: turn 1: 'value' must be a string, got a number",
        ),
        (
            "turn.json",
            json.dumps([{"conversations": ["hi"]}]),
            r"turn\.json record 0: turn 0 must be an object with 'from' and 'value', got a string",
        ),
        (
            "list.json",
            json.dumps([{"conversations": {"from": "user", "value": "hi"}}]),
            r"list\.json record 0: 'conversations' must be a list of turns, got an object",
        ),
        (
            "novalue.json",
            json.dumps([{"conversations": [{"from": "human"}]}]),
            r"novalue\.json record 0: turn 0 has no 'value'",
        ),
        (
            "role.jsonl",
            json.dumps({"conversations": [{"from": ["user"], "value": "hi"}]}) + "\n",
            r"role\.jsonl line 1: turn 0 has role a list",
        ),
        (
            "field.jsonl",
            json.dumps({"task": "caption", "image": "a.png", "caption": {"text": "x"}}) + "\n",
            r"field\.jsonl line 1: field 'caption' must be a string, got dict",
        ),
        ("deep.json", "[" * 100_000, r"deep\.json: JSON nested too deeply to read"),
        (
            "deep.jsonl",
            json.dumps(chat("a")) + "\n" + '{"a": ' * 100_000 + "\n",
            r"deep\.jsonl line 2: JSON nested too deeply",
        ),
    ],
)
def test_bad_input_names_the_file_and_the_record(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataFormatError, match=message):
        load_records(tmp_path / name)


def test_an_empty_assistant_answer_is_found_by_its_turn():
    assert empty_answer_turn(chat("a", "fine")) is None
    assert empty_answer_turn(chat("a", " \n")) == 1
    assert empty_answer_turn({"task": "caption", "image": "p", "caption": ""}) is None  # no turns


def test_training_skips_an_empty_answer_counts_it_and_resumes_past_it(tmp_path, tiny_tokenizer):
    """Record 2 answers nothing: its sample is dropped and counted, and the sampler moves past it, so a run
    resumed after the first batch reads records 4..7, neither replaying one nor skipping a good one."""
    (tmp_path / "t.json").write_text(
        json.dumps([chat(f"q{i}", " " if i == 2 else f"a{i}") for i in range(8)])
    )
    cfg = DataConfig(
        paths=[str(tmp_path / "t.json")], image_size=16, max_len=256, num_workers=0, shuffle=False
    )
    loader = build_dataloader(cfg, tiny_tokenizer, num_image_tokens=N_IMG, batch_size=4)
    first = next(iter(loader))
    assert first["num_samples"] == 3 and loader.stats.total[stats.DROPPED_EMPTY_ANSWER] == 1
    resumed = build_dataloader(cfg, tiny_tokenizer, num_image_tokens=N_IMG, batch_size=4)
    resumed.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    rest = list(resumed)
    assert sum(b["num_samples"] for b in rest) == 4
    assert resumed.stats.total[stats.DROPPED_EMPTY_ANSWER] == 1  # counted once, in the first part


def test_multitask_templates_match_the_evaluators_prompts():
    assert task_prompt_and_target({"task": "caption", "image": "p", "caption": "a red circle."}) == (
        "<img>p</img>Describe the image in English:",
        " a red circle.",
    )
    assert task_prompt_and_target(
        {"task": "vqa", "image": "p", "question": "What color?", "answer": "red"}
    ) == ("<img>p</img>What color? Answer:", " red")
    assert task_prompt_and_target(
        {
            "task": "grounding",
            "image": "p",
            "ref": "the red circle",
            "bbox": [10, 20, 50, 60],
            "width": 100,
            "height": 200,
        }
    ) == ("<img>p</img><ref>the red circle</ref><box>", "(100,100),(500,300)</box>")
    prompt, target = task_prompt_and_target(
        {"task": "ocr", "image": "p", "texts": [{"text": "cat", "quad": [[1, 2], [3, 2], [3, 4], [1, 4]]}]}
    )
    assert (prompt, target) == (
        "<img>p</img>OCR with grounding:",
        " <ref>cat</ref><quad>(1,2),(3,2),(3,4),(1,4)</quad>",
    )
    assert task_prompt_and_target({"image": "p", "caption": "pair"})[0].endswith(
        "Describe the image in English:"
    )


def test_task_records_supervise_only_the_target_and_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    sample = render_task(
        tok, {"task": "vqa", "image": "p.png", "question": "What color?", "answer": "red"}, N_IMG
    )
    assert tok.decode([t for t in sample.labels if t != -100]) == " red<|endoftext|>"
    assert sample.input_ids[-1] == tok.convert_tokens_to_ids("<|endoftext|>") and sample.image_paths == [
        "p.png"
    ]
    text = render_task(tok, {"task": "text", "text": "hello world"}, N_IMG)
    assert text.image_paths == [] and text.labels == [-100] + text.input_ids[1:]  # all but the first label


def test_pretrain_pairs_load_from_csv_and_parquet(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"url": ["a.png", "b.png"], "text": ["one", "two"]})
    df.to_csv(tmp_path / "p.csv", index=False)
    df.to_parquet(tmp_path / "p.parquet")
    for f in ("p.csv", "p.parquet"):
        ds = load_pretrain_pairs(tmp_path / f, image_column="url", caption_column="text")
        assert [dict(r) for r in ds] == [
            {"image": "a.png", "caption": "one"},
            {"image": "b.png", "caption": "two"},
        ]


def test_a_malformed_pretraining_file_names_the_file_and_the_row(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"image": "a.png", "caption": "x"}\n{"image": "b.png", "caption": \n')
    with pytest.raises(DataFormatError, match=r"p\.jsonl: cannot read the pretraining pairs: .*row 1"):
        load_pretrain_pairs(tmp_path / "p.jsonl")


def _dataset_files(tmp_path, n=6):
    for i in range(n):
        write_image(tmp_path / "imgs" / f"{i}.png", color=(i * 40, 0, 0))
    records = [chat(f"Picture 1: <img>imgs/{i}.png</img>\nwhat is {i}?", f"it is {i}") for i in range(n)]
    (tmp_path / "train.json").write_text(json.dumps(records))
    return tmp_path / "train.json"


def test_dataset_decodes_images_and_builds_contract_batches(tmp_path, tiny_tokenizer):
    path = _dataset_files(tmp_path)
    for packing in (False, True):
        cfg = DataConfig(paths=[str(path)], image_size=16, max_len=256, num_workers=0, packing=packing)
        loader = build_dataloader(cfg, tiny_tokenizer, num_image_tokens=N_IMG, batch_size=3)
        batches = list(loader)
        assert len(batches) == 2
        b = batches[0]
        assert b["pixel_values"].shape == (3, 3, 16, 16) and b["num_samples"] == 3 and "_stats" not in b
        n_spans = (b["input_ids"] == tiny_tokenizer.convert_tokens_to_ids("<img>")).sum()
        assert n_spans == b["pixel_values"].shape[0]
        assert b["input_ids"].shape == b["labels"].shape == b["position_ids"].shape
        assert loader.stats.total[stats.SAMPLES] == 6


def test_sample_too_long_to_fit_without_cutting_an_image_is_dropped_and_counted(tmp_path, tiny_tokenizer):
    path = _dataset_files(tmp_path, n=2)
    cfg = DataConfig(paths=[str(path)], image_size=16, max_len=8, num_workers=0)
    loader = build_dataloader(cfg, tiny_tokenizer, num_image_tokens=N_IMG, batch_size=2)
    assert list(loader) == []
    assert loader.stats.total[stats.DROPPED_TOO_LONG] == 2


def test_corrupt_image_fails_by_default_and_is_skipped_and_counted_when_allowed(tmp_path, tiny_tokenizer):
    path = _dataset_files(tmp_path, n=4)
    (tmp_path / "imgs" / "2.png").write_bytes(b"garbage")
    cfg = DataConfig(paths=[str(path)], image_size=16, max_len=256, num_workers=0, shuffle=False)
    loader = build_dataloader(cfg, tiny_tokenizer, num_image_tokens=N_IMG, batch_size=2)
    with pytest.raises(
        ImageLoadError,
        match=r"cannot decode image .*2\.png \(referenced by .*train\.json record 2\)"
        r".*exceed data\.max_bad_images=0",
    ):
        list(loader)
    cfg.max_bad_images = 1
    loader = build_dataloader(cfg, tiny_tokenizer, num_image_tokens=N_IMG, batch_size=2)
    assert sum(b["num_samples"] for b in loader) == 3
    assert loader.stats.total[stats.DROPPED_BAD_IMAGE] == 1
    (tmp_path / "imgs" / "3.png").write_bytes(b"garbage")  # a second bad file exceeds the cap
    loader = build_dataloader(cfg, tiny_tokenizer, num_image_tokens=N_IMG, batch_size=2)
    with pytest.raises(
        ImageLoadError, match=r"3\.png.*2 distinct bad image files exceed data\.max_bad_images=1"
    ):
        list(loader)


def test_streamed_pretraining_pairs_are_split_across_ranks(tmp_path, tiny_tokenizer):
    for i in range(4):
        write_image(tmp_path / f"{i}.png")
    for shard in range(2):
        lines = [
            json.dumps({"image": f"{i}.png", "caption": f"c{i}"}) for i in range(shard * 2, shard * 2 + 2)
        ]
        (tmp_path / f"s{shard}.jsonl").write_text("\n".join(lines) + "\n")
    seen = 0
    for rank in (0, 1):
        cfg = DataConfig(
            paths=[str(tmp_path / "s0.jsonl"), str(tmp_path / "s1.jsonl")],
            format="pretrain",
            streaming=True,
            image_size=16,
            max_len=128,
            num_workers=0,
        )
        loader = build_dataloader(
            cfg, tiny_tokenizer, num_image_tokens=N_IMG, batch_size=4, rank=rank, world_size=2
        )
        batches = list(loader)
        seen += sum(b["num_samples"] for b in batches)
        assert all(b["pixel_values"].shape[0] == b["num_samples"] for b in batches)
    assert seen == 4
