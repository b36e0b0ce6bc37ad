"""data.check: the dataset check finds each kind of problem planted in a small file, passes a clean one,
reads data exactly as training does (tokens, max_len, packing) and sets its exit status by the threshold."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from data.check import CheckOptions, check_data
from data.check.scan import init_scan, read_chunks, scan_chunk
from data.dataset import DataConfig, SampleBuilder
from data.formats import load_records
from train.data_check_cli import main as check_main

REPO = Path(__file__).resolve().parents[1]
N_IMG = 4  # image tokens per image in these tests


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_tokenizer):
    """A tokenizer directory and three images (a.png, b.png, corrupt.png: bytes that are no image)."""
    root = tmp_path_factory.mktemp("check")
    tiny_tokenizer.save_pretrained(root / "tokenizer")
    for name, colour in (("a.png", (200, 30, 30)), ("b.png", (30, 30, 200))):
        Image.new("RGB", (32, 24), colour).save(root / name)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def chat(user: str, answer: str) -> dict:
    return {"conversations": [{"from": "user", "value": user}, {"from": "assistant", "value": answer}]}


def clean_records(n: int = 8) -> list[dict]:
    """Records with nothing wrong: chats with one or two images and a grounded answer, and task records."""
    records = []
    for i in range(n):
        records.append(chat(f"Picture 1: <img>a.png</img>\nWhat colour is it? ({i})", f"It is red ({i})."))
    records.append(
        chat(
            "<img>a.png</img><img>b.png</img>Find the dog.", "<ref>the dog</ref><box>(10,20),(300,400)</box>"
        )
    )
    records.append(
        chat("<img>b.png</img><ref>the dog</ref><box>", "<ref>the dog</ref><box>(1,2),(3,4)</box>")
    )
    records.append({"task": "grounding", "image": "a.png", "ref": "the cat", "box": [0, 0, 999, 999]})
    records.append(
        {
            "task": "ocr",
            "image": "b.png",
            "texts": [{"text": "stop", "quad": [[1, 2], [30, 2], [30, 9], [1, 9]]}],
        }
    )
    return records


def write(folder: Path, name: str, records: list, lines: list[str] = ()) -> Path:
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text(
            "".join(json.dumps(r) + "\n" for r in records) + "".join(line + "\n" for line in lines)
        )
    else:
        path.write_text(json.dumps(records))
    return path


def run_check(path: Path, tokenizer, mode: str = "fast", image_tokens: int = N_IMG, **config):
    config = DataConfig(paths=[str(path)], **{"max_len": 256, **config})
    return check_data(
        config, tokenizer, image_tokens, CheckOptions(mode=mode, progress=False, workers=1)
    ).report


def error_kinds(report: dict) -> dict[str, int]:
    return {k: p["count"] for k, p in report["problems"].items() if p["severity"] == "error"}


def test_a_clean_file_passes_with_its_counts(folder, tiny_tokenizer):
    report = run_check(write(folder, "clean.json", clean_records()), tiny_tokenizer, mode="full")
    assert report["result"]["passed"] and report["problems"] == {}
    assert report["records"] == report["samples"] == 12
    assert report["formats"] == {"qwen": 10, "multitask": 2}
    assert report["tasks"] == {"chat": 10, "grounding": 1, "ocr": 1}
    assert report["images_per_sample"] == {"1": 11, "2": 1}
    assert report["images"] == {"distinct": 2, "checked": 2, "how": "decoded", "samples_with_bad_images": 0}
    tokens = report["tokens"]
    assert sum(b["samples"] for b in tokens["histogram"]) == 12
    assert 0 < tokens["supervised"] < tokens["used"] == tokens["before_truncation"]["total"]


# (kind, records planted twice among clean ones, malformed JSONL lines, config, mode)
PLANTED = {
    "invalid_record": (
        [
            {"conversations": [{"from": "bot", "value": "hi"}]},
            {"task": "grounding", "image": "nope.png", "ref": "x", "bbox": [1, 2, 3, 4]},
        ],  # size unknown
        ["{not json"],
        {},
        "fast",
    ),
    "malformed_img_tag": ([chat("<img>a.png What is it?", "red")], [], {}, "fast"),
    "image_count_mismatch": (
        [
            {
                "image": ["a.png"],
                "conversations": [
                    {"from": "human", "value": "<image><image> Compare."},
                    {"from": "gpt", "value": "same"},
                ],
            }
        ],
        [],
        {},
        "fast",
    ),
    "bad_box": (
        [
            chat("<img>a.png</img>Where?", "<ref>it</ref><box>(0,0),(1000,5)</box>"),
            chat("<img>a.png</img>Read it.", "<ref>stop</ref><quad>(1,2),(3,4),(5,6)</quad>"),
        ],
        [],
        {},
        "fast",
    ),
    "malformed_grounding_tag": (
        [
            chat("<img>a.png</img>Where?", "<ref>it<box>(1,2),(3,4)</box>"),
            chat("<img>a.png</img>Where?", "it is at (1,2),(3,4)</box>"),
        ],
        [],
        {},
        "fast",
    ),
    "control_token_in_text": ([chat("<img>a.png</img>What is <imgpad>?", "red")], [], {}, "fast"),
    "no_supervised_tokens": (
        [{"conversations": [{"from": "user", "value": "<img>a.png</img>hello"}]}],
        [],
        {"assistant_only": True},
        "fast",
    ),
    "dropped_too_long": (
        [
            {
                "task": "vqa",
                "image": "a.png",
                "answer": "yes",
                "question": "Is the red car in the "
                "park near the water, with the people and the boats in the harbour at sunset?",
            }
        ],
        [],
        {"max_len": 30},
        "fast",
    ),
    "missing_image": ([chat("<img>nope.png</img>What is it?", "red")], [], {}, "fast"),
    "undecodable_image": ([chat("<img>corrupt.png</img>What is it?", "red")], [], {}, "full"),
}


@pytest.mark.parametrize("kind", list(PLANTED))
def test_each_planted_problem_is_found_and_counted(folder, tiny_tokenizer, kind):
    planted, bad_lines, config, mode = PLANTED[kind]
    records = clean_records(4) + planted + clean_records(2) + planted
    path = write(folder, f"{kind}.jsonl", records, lines=bad_lines * 2)
    report = run_check(path, tiny_tokenizer, mode=mode, max_bad_images=100, **config)
    expected = 2 * (len(planted) + len(bad_lines))
    if kind in ("missing_image", "undecodable_image"):  # counted by file, judged by samples
        assert report["problems"][kind]["count"] == 1
        assert report["images"]["samples_with_bad_images"] == expected
    else:
        assert error_kinds(report) == {kind: expected}
        assert report["result"]["error_records"] == expected
        assert not report["result"]["passed"]  # 0.1% allowed
    assert report["problems"][kind]["examples"][0]["where"].startswith(str(path))


def test_truncation_that_cuts_an_image_span_is_reported_and_max_len_is_honoured(folder, tiny_tokenizer):
    """With 32 tokens per image the second image's span covers token 64: at max_len 64 the sample is cut
    before it (warnings, not errors); at max_len 256 nothing is cut."""
    record = chat(
        "<img>a.png</img>Picture 2: <img>b.png</img> the second one", "They show the same car in the park."
    )
    sample = SampleBuilder(tiny_tokenizer, 32, DataConfig(paths=[])).tokenize(record, "r")
    img_start = tiny_tokenizer.convert_tokens_to_ids("<img>")
    second = [i for i, t in enumerate(sample.input_ids) if t == img_start][1]
    assert second < 64 < second + 33 < len(sample) < 256  # the premise: token 64 lies inside image 2
    path = write(folder, "long.json", [record] + [chat(f"Hello {i}.", "Hi.") for i in range(3)])
    at_64 = run_check(path, tiny_tokenizer, max_len=64, image_tokens=32)
    assert {k: p["count"] for k, p in at_64["problems"].items()} == {"truncated": 1, "image_span_cut": 1}
    assert at_64["result"]["passed"]
    assert at_64["tokens"]["used"] == at_64["tokens"]["before_truncation"]["total"] - len(sample) + second
    at_256 = run_check(path, tiny_tokenizer, max_len=256, image_tokens=32)
    assert (
        at_256["problems"] == {}
        and at_256["tokens"]["used"] == at_256["tokens"]["before_truncation"]["total"]
    )


def test_duplicates_are_warnings_naming_the_first_occurrence(folder, tiny_tokenizer):
    records = clean_records(3)
    path = write(folder, "dup.json", records + [records[1], records[1]])
    report = run_check(path, tiny_tokenizer)
    assert report["problems"]["duplicate"]["count"] == 2 and report["result"]["passed"]
    assert (
        report["problems"]["duplicate"]["examples"][0]["message"]
        == f"same tokens and images as {path} record 1"
    )


def test_bad_images_within_max_bad_images_pass_as_training_would(folder, tiny_tokenizer):
    path = write(folder, "one_missing.json", clean_records() + [chat("<img>gone.png</img>What?", "red")])
    assert run_check(path, tiny_tokenizer, max_bad_images=1)["result"]["passed"]
    failed = run_check(path, tiny_tokenizer, max_bad_images=0)["result"]
    assert not failed["passed"] and "data.max_bad_images=0" in failed["failures"][0]


def test_the_check_tokenises_exactly_as_training(folder, tiny_tokenizer):
    """The check's tokenizer stand-in (PieceCache) gives every sample the ids, labels and images of
    SampleBuilder with the real tokenizer, and the lengths training uses at max_len."""
    import hashlib
    from array import array

    records = clean_records() + [
        {
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "a red picture"},
            ],
        },
        {"task": "vqa", "image": "b.png", "question": "Which colour?", "answer": "blue"},
        {"task": "text", "text": "Plain text: a dog runs on the beach."},
    ]
    path = write(folder, "mixed.json", records)
    config = DataConfig(paths=[str(path)], max_len=40)
    init_scan(tiny_tokenizer, N_IMG, config, max_examples=5)
    result = scan_chunk(next(read_chunks(config, [])))
    builder = SampleBuilder(tiny_tokenizer, N_IMG, config)
    normalised, wheres = load_records(path)
    assert len(result.digests) == len(normalised) == 15
    for i, (record, where) in enumerate(zip(normalised, wheres)):
        sample = builder.tokenize(record, where)
        identity = array("i", sample.input_ids).tobytes() + "\0".join(sample.image_paths).encode()
        assert result.digests[i] == hashlib.blake2b(identity, digest_size=12).digest()
        assert result.full_len[i] == len(sample)
        built = builder.build(record, where)  # what the training dataset yields at max_len 40
        assert result.kept_len[i] == len(built["input_ids"])
        assert result.supervised[i] == int((built["labels"] != -100).sum())


def test_packing_changes_the_padding_estimate_not_the_samples(folder, tiny_tokenizer):
    path = write(folder, "pack.json", clean_records())
    padded = run_check(path, tiny_tokenizer, max_len=256)
    packed = run_check(path, tiny_tokenizer, max_len=256, packing=True)
    assert padded["tokens"] == packed["tokens"]
    options = CheckOptions(progress=False, workers=1, micro_batch=4)
    for report, packing in ((padded, False), (packed, True)):
        assert report["batches"]["packing"] is packing
    padded4 = check_data(DataConfig(paths=[str(path)], max_len=256), tiny_tokenizer, N_IMG, options).report
    packed4 = check_data(
        DataConfig(paths=[str(path)], max_len=256, packing=True), tiny_tokenizer, N_IMG, options
    ).report
    assert packed4["batches"]["padding_fraction"] < padded4["batches"]["padding_fraction"]


def test_the_padding_estimate_forms_the_trainers_token_bounded_batches(folder, tiny_tokenizer):
    """train.micro_batch_tokens: a bound no sample pair fits makes every sample its own batch (no padding);
    a bound nothing reaches leaves micro_batch's batches."""
    path = write(folder, "bounded.json", clean_records())
    config = DataConfig(paths=[str(path)], max_len=64, packing=True)  # four samples take more than a row

    def batches(**bound):
        options = CheckOptions(progress=False, workers=1, micro_batch=4, **bound)
        return check_data(config, tiny_tokenizer, N_IMG, options).report["batches"]

    by_samples = batches()
    assert by_samples["padding_fraction"] > 0
    assert {
        k: v for k, v in batches(micro_batch_tokens=10**9).items() if k != "micro_batch_tokens"
    } == by_samples
    alone = batches(micro_batch_tokens=1)
    assert alone["padding_fraction"] == 0 and alone["micro_batch_tokens"] == 1


def test_streamed_pretraining_pairs_are_checked_like_the_streaming_dataset(folder, tiny_tokenizer):
    pairs = [{"img": "a.png", "text": f"a red picture {i}"} for i in range(5)] + [
        {"img": "nope.png", "text": "x"}
    ]
    path = write(folder, "pairs.jsonl", pairs)
    report = run_check(
        path,
        tiny_tokenizer,
        streaming=True,
        format="pretrain",
        image_column="img",
        caption_column="text",
        max_bad_images=1,
    )
    assert (
        report["records"] == 6 and report["formats"] == {"pretrain": 6} and report["tasks"] == {"caption": 6}
    )
    assert report["images"]["samples_with_bad_images"] == 1 and report["result"]["passed"]


def test_webdataset_shards_are_checked_sample_by_sample(folder, tiny_tokenizer):
    """data.format: webdataset: the images are shard members (no file to look for); a sample without a
    caption member is an invalid record, and full mode decodes every image member as training would."""
    from data.webdataset import write_shards

    png = (folder / "a.png").read_bytes()
    samples = [{"__key__": f"{i:03d}", "png": png, "txt": f"a red picture {i}".encode()} for i in range(5)]
    samples += [{"__key__": "005", "png": png}, {"__key__": "006", "png": b"not an image", "txt": b"broken"}]
    shards = write_shards(samples, folder / "shards", "wds", 4)  # 2 shards
    pattern = str(folder / "shards" / "wds-{000000..000001}.tar")
    assert [s.name for s in shards] == ["wds-000000.tar", "wds-000001.tar"]

    fast = run_check(Path(pattern), tiny_tokenizer, format="webdataset", max_bad_images=2)
    assert fast["records"] == 7 and fast["formats"] == {"webdataset": 6} and fast["tasks"] == {"caption": 6}
    assert error_kinds(fast) == {"invalid_record": 1}  # key 005: no caption member
    assert "key '005'" in fast["problems"]["invalid_record"]["examples"][0]["where"]
    assert fast["images"]["checked"] == 0  # in the shards: nothing to stat

    full = run_check(Path(pattern), tiny_tokenizer, mode="full", format="webdataset", max_bad_images=2)
    assert error_kinds(full) == {"invalid_record": 1, "undecodable_image": 1}
    assert full["records"] == 7 and full["samples"] == 5


@pytest.mark.slow
def test_worker_processes_give_the_report_of_one_process(folder, tiny_tokenizer):
    path = write(folder, "workers.jsonl", clean_records(30) * 3 + [chat("<img>a.png", "x")])
    config = DataConfig(paths=[str(path)], max_len=64)
    reports = [
        check_data(config, tiny_tokenizer, N_IMG, CheckOptions(progress=False, workers=w)).report
        for w in (1, 2)
    ]
    for r in reports:
        del r["timing"], r["check"]["workers"]
    assert reports[0] == reports[1] and reports[0]["problems"]["duplicate"]["count"] == 2 * 34


def test_cli_exit_status_follows_the_threshold_and_writes_the_report(folder, tmp_path):
    records = clean_records(8) + [chat("<img>a.png", "unclosed")]  # 1 error in 13 records: 7.7%
    path = write(folder, "threshold.json", records)
    args = [
        "--data",
        str(path),
        "--tokenizer",
        str(folder / "tokenizer"),
        "--image-tokens",
        str(N_IMG),
        "--no-progress",
        "--out",
        str(tmp_path),
        "data.max_len=128",
    ]
    assert check_main(args + ["--max-error-fraction", "0.1"]) == 0
    assert check_main(args + ["--max-error-fraction", "0.05"]) == 1
    assert check_main(args) == 1  # default 0.001
    written = json.loads((tmp_path / "data_check.json").read_text())
    assert written["problems"]["malformed_img_tag"]["count"] == 1 and written["data"]["max_len"] == 128
    assert "FAILED" in (tmp_path / "data_check.txt").read_text()


def test_cli_reads_a_recipe_with_its_overrides_and_plots(folder, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs the optional matplotlib (the plot extra)")
    path = write(folder, "recipe_data.json", clean_records()[:8])  # chats: max_len 40 truncates, drops none
    args = [
        str(REPO / "recipes" / "tiny" / "pretrain.yaml"),
        f"model.tokenizer_path={folder / 'tokenizer'}",
        f"data.paths=[{path}]",
        "data.max_len=40",
        f"checkpoint.out_dir={tmp_path}",
        "--no-progress",
        "--plot",
    ]
    assert check_main(args) == 0  # truncation is a warning
    report = json.loads((tmp_path / "data_check.json").read_text())
    assert report["data"]["max_len"] == 40 and report["problems"]["truncated"]["count"] > 0
    assert report["data"]["num_image_tokens"] == 16  # the tiny preset's
    assert (tmp_path / "data_check_lengths.png").stat().st_size > 1000


def test_cli_user_mistakes_print_one_error_line(folder, tmp_path, monkeypatch, capsys):
    from models.errors import run_cli

    monkeypatch.setattr(
        sys,
        "argv",
        ["data.check", "--data", str(tmp_path / "missing.json"), "--tokenizer", str(folder / "tokenizer")],
    )
    with pytest.raises(SystemExit) as exit_:
        run_cli(check_main)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: data file not found: {tmp_path / 'missing.json'}"
    ]


def pair(prompt: str, chosen: str, rejected: str) -> dict:
    return {
        "conversations": [{"from": "user", "value": prompt}],
        "chosen": {"from": "assistant", "value": chosen},
        "rejected": {"from": "assistant", "value": rejected},
    }


def test_preference_pairs_are_checked_as_dpo_trains_on_them(folder, tiny_tokenizer):
    """A pair is two samples (chosen, rejected) under the task "preference"; each answer is scanned for tag
    problems; a pair that training refuses (identical answers, a prompt that max_len cuts through an image
    span) is an invalid record with training's reason."""
    good = [pair(f"Picture 1: <img>a.png</img>\nWhat colour is it? ({i})", "red", "blue") for i in range(6)]
    good.append(
        pair(
            "<img>b.png</img>Find the dog.",
            "<ref>the dog</ref><box>(1,2),(300,400)</box>",
            "<ref>the dog</ref><box>(500,600),(900,990)</box>",
        )
    )
    bad = [
        pair("<img>a.png</img>What colour?", "red", "red"),  # identical answers
        pair(
            "<img>a.png</img>Where?", "<ref>it</ref><box>(1,2),(3,4)</box>", "<ref>it<box>(1,2),(3,4)</box>"
        ),
        pair(
            "A long preamble before the picture: " + "words " * 12 + "<img>b.png</img>Which colour?",
            "blue",
            "green",
        ),
    ]
    path = write(folder, "pairs.json", good + bad)
    report = run_check(path, tiny_tokenizer, max_len=128, image_tokens=64)
    assert report["records"] == 10
    assert report["tasks"] == {"preference": 9}  # the identical pair is refused before its task is known
    assert report["samples"] == 2 * 8  # two per pair that tokenises (a tag problem is found, not fatal)
    assert error_kinds(report) == {"invalid_record": 2, "malformed_grounding_tag": 1}
    messages = [e["message"] for e in report["problems"]["invalid_record"]["examples"]]
    assert "identical" in messages[0] and "cuts through an image span of the prompt" in messages[1]
    assert report["problems"]["invalid_record"]["examples"][1]["where"] == f"{path} record 9"
    clean = run_check(
        write(folder, "good_pairs.json", good), tiny_tokenizer, mode="full", max_len=256, image_tokens=64
    )
    assert clean["result"]["passed"] and clean["problems"] == {}
    assert 0 < clean["tokens"]["supervised"] < clean["tokens"]["used"]
