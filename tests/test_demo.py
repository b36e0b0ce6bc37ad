"""launch/demo.sh end to end at a reduced size (the Qwen-VL demo and an HF family's), the world's tokenizer as
the family's qwen.tiktoken, and the recipe's eval section the demo relies on."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.synthetic import generate
from models.families.processor import build_family_tokenizer
from models.families.specs import QWEN2_5_VL
from train.demo import write_world_tiktoken
from train.loop import train
from train.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
STAGES = ["untrained", "pretrain", "multitask", "sft", "dpo"]  # dpo: the optional fourth stage (DPO=1)
BENCHES = {
    "synth_caption": "CIDEr",
    "synth_vqa": "vqa_accuracy",
    "synth_grounding": "accuracy_iou0.5",
    "synth_mc": "accuracy",
    "synth_preference": "accuracy",
}
EVAL_LIMIT = 4
# The reduced size: a world of 16 training and 8 held-out pictures, 2 steps of 2 samples per stage.
SMALL = {
    "N_TRAIN": "16",
    "N_EVAL": "8",
    "EVAL_LIMIT": str(EVAL_LIMIT),
    "PRETRAIN_STEPS": "2",
    "MULTITASK_STEPS": "2",
    "SFT_STEPS": "2",
    "DPO_STEPS": "2",
    "MICRO_BATCH": "2",
}


def run_demo(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "launch" / "demo.sh"), str(out), *args],
        env={**os.environ, "PYTHON": sys.executable, **SMALL, **env},
        cwd=out.parent,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_demo_writes_metrics_of_every_stage_on_every_benchmark(tmp_path):
    out = tmp_path / "demo"
    proc = run_demo(out, DPO="1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == STAGES
    for stage in STAGES:
        assert set(metrics[stage]) == set(BENCHES), stage
        for bench, headline in BENCHES.items():
            scores = metrics[stage][bench]
            assert isinstance(scores[headline], float) and 0.0 <= scores[headline] <= 1000.0, (stage, bench)
            assert scores["num_samples"] == EVAL_LIMIT
    # Each stage's table is printed after it, SFT evaluated with ChatML prompts, and a summary at the end.
    assert proc.stdout.count("evaluation of ") == len(STAGES)
    assert "(sft, chatml prompts)" in proc.stdout and "(multitask, raw prompts)" in proc.stdout
    assert "(dpo, chatml prompts)" in proc.stdout and "rewards/accuracies" in proc.stdout
    assert "| sft |" in proc.stdout and "| dpo |" in proc.stdout and "demo wall time" in proc.stdout
    # DPO against its SFT start on the same samples (eval_mm.compare): every benchmark with a per-sample
    # metric, and DPO's implicit reward on the held-out pairs (eval_mm.metrics.reward_accuracy),
    # also in metrics.json
    comparison = json.loads((out / "dpo_vs_sft.json").read_text())
    assert set(comparison) == set(BENCHES) and "skipped" in comparison["synth_caption"]
    for bench in ("synth_vqa", "synth_grounding", "synth_mc", "synth_preference"):
        change = comparison[bench]
        assert change["num_samples"] == EVAL_LIMIT and change["won"] + change["lost"] <= EVAL_LIMIT
        assert change["change"] == pytest.approx(change["candidate"] - change["baseline"])
        assert change["candidate"] == pytest.approx(metrics["dpo"][bench][BENCHES[bench]], abs=0.005), (
            bench
        )  # VQA: 2 digits
    reward = metrics["dpo"]["synth_preference"]
    assert reward["num_pairs"] == EVAL_LIMIT and 0.0 <= reward["reward_accuracy"] <= 100.0
    assert "DPO against the SFT export it started from" in proc.stdout and "reward accuracy" in proc.stdout


def test_the_family_demo_trains_and_scores_the_untrained_and_the_trained_model(tmp_path):
    """--family qwen2_5_vl: the tiny random Qwen2.5-VL, exported untrained and after its SFT stage, each
    scored on the four benchmarks in the family's chat template; one table with both rows."""
    out = tmp_path / "demo"
    proc = run_demo(out, "--family", "qwen2_5_vl")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["untrained", "sft"]
    for stage, scores in metrics.items():
        assert set(scores) == set(BENCHES) - {"synth_preference"}, stage
        assert all(scores[bench]["num_samples"] == EVAL_LIMIT for bench in scores), stage
    exports = [out / stage / "final" for stage in metrics]
    assert [json.loads((e / "config.json").read_text())["model_type"] for e in exports] == ["qwen2_5_vl"] * 2
    assert [json.loads((e / "training_info.json").read_text())["steps"] for e in exports] == [1, 2]
    # the grounding request in the family's own words, its answer read back from the family's convention
    grounding = [
        json.loads(line) for line in (out / "sft" / "eval" / "synth_grounding" / "predictions.jsonl").open()
    ]
    assert all("output its bbox coordinates using JSON format." in r["prompt"] for r in grounding)
    assert proc.stdout.count("evaluation of ") == 2 and "(sft, chatml prompts)" in proc.stdout
    table = proc.stdout[proc.stdout.index("| stage |") :]
    assert "| untrained |" in table and "| sft |" in table and "| pretrain |" not in table


@pytest.mark.parametrize(
    ("args", "env", "error"),
    [
        (["--family", "qwen9_vl"], {}, "--family qwen9_vl: no recipes/tiny/demo_qwen9_vl.yaml"),
        (["--family", "qwen2_5_vl"], {"DPO": "1"}, "--family qwen2_5_vl has no DPO stage"),
        (["--famliy", "qwen2_5_vl"], {}, "usage: bash launch/demo.sh [OUT_DIR [--family NAME]]"),
    ],
)
def test_the_demo_refuses_a_family_it_cannot_train_before_doing_anything(tmp_path, args, env, error):
    proc = run_demo(tmp_path / "demo", *args, **env)
    assert proc.returncode == 2 and proc.stderr.startswith("error: launch/demo.sh") and error in proc.stderr
    assert not (tmp_path / "demo").exists()


def test_the_world_tokenizer_becomes_the_family_tokenizer_over_the_same_tokens(tmp_path):
    """write_world_tiktoken: the world's BPE tokens as qwen.tiktoken ranks, its own special tokens left out;
    the family's tokenizer built from them has one id per world token plus the family's added tokens, and cuts
    the world's words as the world's tokenizer does (numbers differ: Qwen's pre-tokenizer splits digits)."""
    from transformers import AutoTokenizer

    generate(tmp_path / "world", seed=0, n_train=4, n_eval=2, image_size=56, vocab_size=300)
    world = AutoTokenizer.from_pretrained(tmp_path / "world" / "tokenizer")
    write_world_tiktoken(tmp_path / "world" / "tokenizer", tmp_path / "qwen.tiktoken")
    family = build_family_tokenizer(QWEN2_5_VL, tmp_path / "qwen.tiktoken")

    assert len(family) == len(world) - len(world.get_added_vocab()) + QWEN2_5_VL.num_added_tokens
    text = "Describe the image in English: a red circle at the top left."
    assert family.tokenize(text) == world.tokenize(text)
    assert family.decode(family(text)["input_ids"]) == text


def test_eval_section_without_data_root_fails_before_training(tmp_path):
    recipe = load_recipe(
        REPO / "recipes" / "tiny" / "demo_pretrain.yaml",
        ["eval.benches=[synth_vqa]", f"checkpoint.out_dir={tmp_path / 'run'}"],
    )
    with pytest.raises(ValueError, match="eval.data_root"):
        train(recipe)
    assert not (tmp_path / "run").exists()


def test_eval_section_with_an_unknown_benchmark_fails_before_training(tmp_path):
    recipe = load_recipe(
        REPO / "recipes" / "tiny" / "demo_pretrain.yaml",
        ["eval.benches=[synth_vqaa]", f"eval.data_root={tmp_path}", f"checkpoint.out_dir={tmp_path / 'run'}"],
    )
    with pytest.raises(KeyError, match="unknown benchmark 'synth_vqaa'"):
        train(recipe)
