"""launch/demo.sh end to end at a reduced size, and the recipe's eval section it relies on."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_demo_writes_metrics_of_every_stage_on_every_benchmark(tmp_path):
    out = tmp_path / "demo"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "N_TRAIN": "16",
        "N_EVAL": "8",
        "EVAL_LIMIT": str(EVAL_LIMIT),
        "PRETRAIN_STEPS": "2",
        "MULTITASK_STEPS": "2",
        "SFT_STEPS": "2",
        "DPO_STEPS": "2",
        "MICRO_BATCH": "2",
        "DPO": "1",
    }
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "demo.sh"), str(out)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
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
