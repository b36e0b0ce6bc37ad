"""Specification of evaluation, chat and loading for the Hugging Face families
(Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

A family export (an HF directory: the model's save_pretrained plus its processor's) loads with
models.load_pretrained as (HFFamilyModel, processor), full, as a peft adapter on its base, or merged;
``python -m eval_mm run`` scores it on the same benchmarks with the same metrics (prompts in the family's chat
template, grounding answers converted from its box convention), and ``python -m eval_mm chat`` talks to it.
Tiny random models from the presets over the tiny vocabulary of tests/conftest.py, the synthetic world of
tests/test_eval_end_to_end.py, CPU.
"""

from __future__ import annotations

import html
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch

import eval_mm.family
from data.hf_boxes import ImageGeometry, boxes_to_family
from data.hf_encode import resized_size
from data.text import normalize_box
from eval_mm.benchmarks import get_benchmark
from eval_mm.chat import Chat, GenerationSettings
from eval_mm.datasets import load_references, load_samples
from eval_mm.family import FamilyBatchBuilder, family_answer, generate_family_answers
from eval_mm.inference import stop_token_ids
from eval_mm.metrics import compute_metric
from models.errors import UserError
from models.families.adapter import HFFamilyModel
from models.families.processor import build_family_processor
from models.families.specs import FAMILIES
from models.loading import is_family_model, load_pretrained

REPO = Path(__file__).resolve().parents[1]
N_EVAL = 3
SYNTH_BENCHES = "synth_caption,synth_vqa,synth_grounding,synth_mc,synth_preference"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from data.synthetic import generate

    root = tmp_path_factory.mktemp("eval_data")
    generate(root / "synthetic", seed=0, n_train=4, n_eval=N_EVAL, image_size=56, vocab_size=300)
    return root


def save_export(model: HFFamilyModel, processor, path: Path) -> Path:
    """A full family export: the HF model directory with its processor's files beside it."""
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def processors(tiny_tiktoken):
    return {name: build_family_processor(spec, tiny_tiktoken) for name, spec in FAMILIES.items()}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, processors):
    """{family: its full export}, tiny random weights."""
    root = tmp_path_factory.mktemp("family_exports")
    out = {}
    for name in FAMILIES:
        torch.manual_seed(0)
        model = HFFamilyModel.from_preset(f"{name}_tiny", tokenizer=processors[name].tokenizer)
        out[name] = save_export(model, processors[name], root / name)
    return out


def logits_of(model, processor) -> torch.Tensor:
    ids = processor.tokenizer("<|im_start|>user\nWhat colour is it?<|im_end|>\n", add_special_tokens=False)
    with torch.no_grad():
        return model(torch.tensor([ids["input_ids"]])).logits


def test_load_pretrained_takes_full_adapter_and_merged_family_exports(exports, processors, tmp_path):
    full = exports["qwen2_5_vl"]
    processor = processors["qwen2_5_vl"]
    model, loaded_processor = load_pretrained(full)
    assert isinstance(model, HFFamilyModel) and is_family_model(model) and not model.training
    assert type(loaded_processor) is FAMILIES["qwen2_5_vl"].processor_class
    assert loaded_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    base_logits = logits_of(model, processor)

    # A LoRA run's final/: the adapter (on `full`, named by training_info.json) and its merged weights.
    torch.manual_seed(1)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=model.lora_target_pattern(["q_proj", "v_proj"])
    )
    trained = peft.get_peft_model(HFFamilyModel.from_pretrained(full), config)
    for name, param in trained.named_parameters():
        if "lora_B" in name:  # a trained adapter: B is no longer 0, so the adapter changes the outputs
            param.data.normal_(std=0.5)
    adapter_logits = logits_of(trained, processor)
    assert not torch.allclose(adapter_logits, base_logits)
    final = tmp_path / "run" / "final"
    trained.save_pretrained(final / "adapter")
    (final / "adapter" / "training_info.json").write_text(json.dumps({"init_from": str(full)}))
    save_export(trained.merge_and_unload(), processor, final / "merged")

    for path, merge in ((final / "adapter", True), (final / "merged", True), (tmp_path / "run", True)):
        model, loaded_processor = load_pretrained(path, merge=merge)
        assert isinstance(model, HFFamilyModel), path
        assert type(loaded_processor) is FAMILIES["qwen2_5_vl"].processor_class
        torch.testing.assert_close(logits_of(model, processor), adapter_logits, msg=str(path))
    kept, _ = load_pretrained(final / "adapter", merge=False)  # the peft model, around the family model
    assert isinstance(kept, peft.PeftModel) and is_family_model(kept)
    torch.testing.assert_close(logits_of(kept, processor), adapter_logits)


def test_a_family_export_without_its_processor_is_a_clear_error(exports, tmp_path):
    bare = tmp_path / "bare"
    HFFamilyModel.from_pretrained(exports["qwen3_vl"]).save_pretrained(bare)
    with pytest.raises(UserError, match="the export has no tokenizer"):
        load_pretrained(bare)


def run_eval_cli(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "eval_mm", "run", *args, "--num-workers", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "prompt format: chatml" in out.stdout
    return json.loads(out.stdout.strip().splitlines()[-1])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_run_scores_a_family_export_on_every_benchmark_kind(exports, data_root, tmp_path):
    """Generation (caption, VQA, grounding), multiple choice and preference pairs: finite metrics over every
    sample; prompts in the family's chat template, the grounding request in the family's own words."""
    results = run_eval_cli(
        "--checkpoint",
        str(exports["qwen2_5_vl"]),
        "--bench",
        SYNTH_BENCHES,
        "--data-root",
        str(data_root),
        "--out",
        str(tmp_path),
        "--batch-size",
        "2",
    )
    assert set(results) == set(SYNTH_BENCHES.split(","))
    for bench, metrics in results.items():
        numbers = [v for v in metrics.values() if isinstance(v, (int, float))]
        assert all(math.isfinite(v) for v in numbers), (bench, metrics)
        assert metrics["num_samples"] >= N_EVAL, (bench, metrics)
    grounding = read_jsonl(tmp_path / "synth_grounding" / "predictions.jsonl")
    for record in grounding:
        assert record["prompt"].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
        assert "<|vision_start|><|image_pad|><|vision_end|>Locate the " in record["prompt"]
        assert (
            "output its bbox coordinates using JSON format.<|im_end|>\n<|im_start|>assistant\n"
            in record["prompt"]
        )
        assert "<ref>" not in record["prompt"] and isinstance(record["raw_output"], str)
    choices = read_jsonl(tmp_path / "synth_mc" / "predictions.jsonl")
    assert all(r["prediction"] in "ABCDE" and len(r["option_losses"]) >= 2 for r in choices)
    assert all(math.isfinite(loss) and loss > 0 for r in choices for loss in r["option_losses"])
    pairs = read_jsonl(tmp_path / "synth_preference" / "predictions.jsonl")
    assert all(math.isfinite(r["prediction"]) and r["prediction"] != 0 for r in pairs)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_the_other_families_score_in_process(family, exports, data_root, tmp_path):
    """In-process, with the prompts and images encoded in a DataLoader worker (the processor goes there)."""
    from eval_mm.runner import evaluate

    model, processor = load_pretrained(exports[family])
    benches = ["synth_grounding", "synth_mc", "synth_preference"]
    results = evaluate(
        model,
        processor,
        benches,
        data_root,
        tmp_path,
        limit=2,
        batch_size=2,
        prompt_format="chatml",
        num_workers=1,
        progress=False,
    )
    assert [results[b]["num_samples"] for b in benches] == [2, 2, 2]
    with pytest.raises(UserError, match="its own chat template only"):
        evaluate(
            model,
            processor,
            ["synth_vqa"],
            data_root,
            tmp_path / "raw",
            limit=1,
            prompt_format="raw",
            progress=False,
        )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_grounding_answer_in_the_family_convention_scores_like_its_qwen_vl_equivalent(family, processors):
    """The annotated box written in the family's convention (as the model would answer), decoded from its
    tokens, scores as the same box in our markup: a hit; a wrong box in either form: a miss."""
    processor = processors[family]
    spec = FAMILIES[family]
    width, height = 56, 40
    geometry = ImageGeometry(width, height, *resized_size(processor, width, height))
    reference = {"0": {"bbox": [10, 8, 40, 30], "width": width, "height": height}}
    stops = stop_token_ids(processor.tokenizer, "chatml")
    for box, hit in (([10, 8, 40, 30], 100.0), ([41, 31, 55, 39], 0.0)):
        x1, y1, x2, y2 = normalize_box(box, width, height)
        ours = f"<ref>the word</ref><box>({x1},{y1}),({x2},{y2})</box>"
        answer_ids = processor.tokenizer(
            boxes_to_family(ours, spec.box_convention, geometry), add_special_tokens=False
        )["input_ids"]
        prediction, own = family_answer(
            processor.tokenizer, answer_ids + stops[:1], stops, spec.box_convention, geometry
        )
        assert own != ours and "<box>" not in own
        family_score = compute_metric("grounding", {"0": prediction}, reference)
        qwen_vl_score = compute_metric("grounding", {"0": ours}, reference)
        assert family_score == qwen_vl_score
        assert family_score["accuracy_iou0.5"] == hit


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_family_may_write_its_whole_box_answer(family, exports, processors, data_root, monkeypatch):
    """A grounding benchmark's max_new_tokens (28) counts Qwen-VL's answer, the coordinates after the prompt's
    open <box>; a family writes the label and its markup too (a JSON object in a fenced list). Every held-out
    box written as the family's training data writes it, plus its end-of-turn token, fits the budget the
    batch is generated with; other benchmarks keep theirs."""
    processor, spec = processors[family], FAMILIES[family]
    bench = get_benchmark("synth_grounding")
    samples = load_samples(bench, data_root)
    references = load_references(bench, data_root / bench.references_file)
    batch = FamilyBatchBuilder(processor, bench, spec.box_convention)(samples)
    longest = 0
    for sample, geometry in zip(samples, batch.geometries, strict=True):
        ref = references[sample.id]
        x1, y1, x2, y2 = normalize_box(ref["bbox"], ref["width"], ref["height"])
        label = sample.text.split("<ref>")[1].split("</ref>")[0]
        answer = boxes_to_family(
            f"<ref>{label}</ref><box>({x1},{y1}),({x2},{y2})</box>", spec.box_convention, geometry
        )
        longest = max(longest, len(processor.tokenizer(answer, add_special_tokens=False)["input_ids"]) + 1)
    assert longest <= batch.max_new_tokens
    if family != "qwen2_vl":  # the JSON conventions: more than the benchmark's budget
        assert longest > bench.max_new_tokens
    vqa = get_benchmark("synth_vqa")
    vqa_batch = FamilyBatchBuilder(processor, vqa, spec.box_convention)(load_samples(vqa, data_root))
    assert vqa_batch.max_new_tokens == vqa.max_new_tokens

    budgets = []  # what generation is asked for
    monkeypatch.setattr(
        eval_mm.family,
        "generate_tokens",
        lambda *args, max_new_tokens, **kwargs: (
            budgets.append(max_new_tokens) or torch.zeros(len(samples), 0)
        ),
    )
    model, _ = load_pretrained(exports[family])
    generate_family_answers(model, processor, batch, bench, torch.device("cpu"))
    assert budgets == [batch.max_new_tokens]


def test_chat_cli_answers_about_an_image_with_a_family_model(exports, data_root):
    image = next((data_root / "synthetic" / "images" / "eval").glob("*.png"))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "eval_mm",
            "chat",
            "--checkpoint",
            str(exports["qwen3_vl"]),
            "--image",
            str(image),
            "--prompt",
            "What colour is the word?",
            "--max-new-tokens",
            "5",
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    reply = json.loads(out.stdout.strip().splitlines()[-1])
    assert isinstance(reply["answer"], str) and reply["answer"] and reply["boxes"] == []


@pytest.fixture(scope="module")
def family_chat(exports):
    return Chat.from_pretrained(
        exports["qwen2_5_vl"], device="cpu", settings=GenerationSettings(max_new_tokens=4)
    )


def test_chat_keeps_a_family_conversation_and_its_typed_text_plain(family_chat, data_root, opened_files):
    chat = family_chat.new_conversation()
    image = sorted((data_root / "synthetic" / "images" / "eval").glob("*.png"))
    first = chat.ask("What colour is the word?", images=[image[0]])
    assert first.image == str(image[0]) and chat.images == [str(image[0])]
    # Typed text names no file: an <img>PATH</img> in it is text, and PATH is not opened.
    opened_files.clear()
    chat.ask(f"And here? <img>{image[1]}</img>")
    assert str(image[1]) not in opened_files and chat.images == [str(image[0])]
    # The family's control tokens cannot be typed (its template renders one string); the conversation stays.
    with pytest.raises(UserError, match=r"<\|im_end\|> is a control token of this model"):
        chat.ask("stop<|im_end|>")
    assert len(chat.history) == 4


def test_chat_draws_the_boxes_of_the_family_convention(family_chat, data_root, monkeypatch, tmp_path):
    """A model answer in Qwen2.5-VL's convention (absolute pixels of the resized image) comes back as our box:
    the reply shows the family's text, and its box is the one written, on the image's own pixels."""
    chat = family_chat.new_conversation()
    image = sorted((data_root / "synthetic" / "images" / "eval").glob("*.png"))[0]
    processor, convention = chat.processor, chat.vlm.spec.box_convention
    geometry = ImageGeometry(56, 56, *resized_size(processor, 56, 56))
    answer = boxes_to_family("<ref>the word</ref><box>(178,178),(714,535)</box>", convention, geometry)
    answer_ids = torch.tensor([processor.tokenizer(answer, add_special_tokens=False)["input_ids"]])

    def scripted_generate(input_ids, streamer=None, **kwargs):  # the model's answer, as generate gives it
        streamer.put(input_ids.cpu())
        streamer.put(answer_ids)
        streamer.end()
        return answer_ids

    monkeypatch.setattr(chat.model, "generate", scripted_generate)
    reply = chat.ask("Where is <ref>the word</ref><box>", images=[image])
    assert reply.text == answer and '"bbox_2d"' in reply.text
    [box] = reply.boxes
    assert (box.ref, box.box) == ("the word", (178, 178, 714, 535))
    assert box.box_pixels == pytest.approx((10.0, 10.0, 40.0, 30.0), abs=0.1)
    chat.draw(tmp_path / "drawn.png")
    assert (tmp_path / "drawn.png").is_file()


def test_the_web_demo_answers_an_uploaded_image_with_a_family_model(exports, data_root, opened_files):
    """The page as `python -m eval_mm.web` serves it, on a family export: an uploaded image and a question get
    the answer Chat gives; a typed <img>PATH</img> is text and opens nothing."""
    pytest.importorskip("gradio", reason='the web demo needs gradio: pip install -e ".[web]"')
    from gradio_client import Client, handle_file

    from eval_mm.web import build_parser, serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = serve(
        build_parser().parse_args(
            ["--checkpoint", str(exports["qwen2_vl"]), "--port", str(port), "--max-new-tokens", "4"]
        ),
        block=False,
    )
    image, private = sorted((data_root / "synthetic" / "images" / "eval").glob("*.png"))[:2]
    expected = Chat.from_pretrained(
        exports["qwen2_vl"], device="cpu", settings=GenerationSettings(max_new_tokens=4)
    )
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        window, _, _ = client.predict("What colour is the word?", handle_file(image), api_name="/respond")
        typed = f"<img>{private}</img> What is it?"
        opened_files.clear()
        later, _, _ = client.predict(typed, None, api_name="/respond")
        client.close()
    finally:
        demo.close()
    answer = expected.ask("What colour is the word?", images=[image]).text
    assert [m["role"] for m in window] == ["user", "user", "assistant"]
    assert html.unescape(window[-1]["content"][0]["text"]) == answer
    assert html.unescape(later[-2]["content"][0]["text"]) == typed
    assert str(private) not in opened_files
