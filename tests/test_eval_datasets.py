"""Benchmark files -> prompts and references; checkpoint -> prompt format."""

import json

import pytest
from PIL import Image

from eval_mm.benchmarks import get_benchmark
from eval_mm.datasets import BenchmarkDataError, load_references, load_samples
from eval_mm.metrics.choice import MME_COGNITION, MME_PERCEPTION
from eval_mm.prompts import checkpoint_prompt_format


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)


def test_scienceqa_prompt_matches_the_reference(tmp_path):
    _image(tmp_path / "scienceqa/img/1.png")
    (tmp_path / "scienceqa/scienceqa_test_img.jsonl").write_text(
        json.dumps(
            {
                "image": "scienceqa/img/1.png",
                "hint": "",
                "question": "Which?",
                "choices": ["sand", "light"],
                "answer": 1,
            }
        )
        + "\n"
    )
    bench = get_benchmark("scienceqa_img")
    [sample] = load_samples(bench, tmp_path)
    image = tmp_path / "scienceqa/img/1.png"
    assert (
        sample.text
        == f"<img>{image}</img>Context: N/A\nQuestion: Which?\nOptions: A. sand\nB. light\nAnswer:"
    )
    assert sample.options == ("A", "B")
    assert load_references(bench, tmp_path / bench.references_file) == {"0": "B"}


def test_seed_bench_records_carry_their_prompt(tmp_path):
    _image(tmp_path / "seed_bench/a.jpg")
    (tmp_path / "seed_bench/image_input.jsonl").write_text(
        json.dumps(
            {
                "question_id": "q7",
                "prompt": (
                    "<img>seed_bench/a.jpg</img>\nQuestion: x\nOptions: A. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
                ),
                "answer": "C",
            }
        )
        + "\n"
    )
    bench = get_benchmark("seed_bench_img")
    [sample] = load_samples(bench, tmp_path)
    assert sample.id == "q7" and sample.text.startswith(f"<img>{tmp_path}/seed_bench/a.jpg</img>\nQuestion")
    assert load_references(bench, tmp_path / bench.test_file) == {"q7": "C"}


def test_mme_directory(tmp_path):
    results = tmp_path / "mme/Your_Results"
    results.mkdir(parents=True)
    for task in MME_PERCEPTION + MME_COGNITION:
        (results / f"{task}.txt").write_text("1.jpg\tIs it red? Please answer yes or no.\tYes\n")
        _image(tmp_path / f"mme/images/{task}/1.jpg")
    bench = get_benchmark("mme")
    samples = load_samples(bench, tmp_path)
    assert len(samples) == 14 and samples[0].id == "existence/1"
    assert samples[0].text.endswith("</img>\nIs it red? Please answer yes or no.")
    assert load_references(bench, results)["OCR/1"] == ("OCR", "1.jpg", "Yes")


def test_missing_image_and_bad_record_are_named(tmp_path):
    (tmp_path / "gqa").mkdir()
    (tmp_path / "gqa/testdev_balanced.jsonl").write_text(
        json.dumps({"image": "nope.jpg", "question": "q"}) + "\n"
    )
    with pytest.raises(FileNotFoundError, match="testdev_balanced.jsonl record 0: image not found"):
        load_samples(get_benchmark("gqa_testdev"), tmp_path)
    (tmp_path / "gqa/testdev_balanced.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(BenchmarkDataError, match="record 0: missing field 'image'"):
        load_samples(get_benchmark("gqa_testdev"), tmp_path)


def test_prompt_format_from_checkpoint(tmp_path):
    assert checkpoint_prompt_format(tmp_path) == "raw"
    (tmp_path / "config.json").write_text("{}")
    assert checkpoint_prompt_format(tmp_path) == "raw"
    (tmp_path / "generation_config.json").write_text(json.dumps({"chat_format": "chatml"}))
    assert checkpoint_prompt_format(tmp_path) == "chatml"
    (tmp_path / "generation_config.json").write_text(json.dumps({"chat_format": "raw", "stage": "sft"}))
    assert checkpoint_prompt_format(tmp_path) == "raw"
    (tmp_path / "generation_config.json").write_text(json.dumps({"stage": "sft"}))
    assert checkpoint_prompt_format(tmp_path) == "chatml"


@pytest.mark.parametrize("prompt_format, expected_min", [("raw", 8), ("chatml", 1)])
def test_minimum_answer_length_applies_to_raw_prompts_only(tiny_tokenizer, prompt_format, expected_min):
    """The reference's min_new_tokens belong to its raw prompts; a chat model may end its turn at once."""
    import torch

    from eval_mm.inference import PromptBatch, generate_answers

    seen = {}

    class RecordingModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, **kwargs):
            seen.update(kwargs)
            return torch.zeros(input_ids.shape[0], 1, dtype=torch.long)

    batch = PromptBatch(
        samples=[],
        prompts=["p"],
        input_ids=torch.ones(1, 3, dtype=torch.long),
        attention_mask=torch.ones(1, 3, dtype=torch.long),
        pixel_values=torch.zeros(0, 3, 4, 4),
        num_images=[0],
        option_ids=[],
        pad_id=0,
    )
    bench = get_benchmark("synth_caption")
    assert bench.min_new_tokens == 8
    generate_answers(RecordingModel(), tiny_tokenizer, batch, bench, prompt_format, torch.device("cpu"))
    assert seen["min_new_tokens"] == expected_min
