"""`python -m eval_mm compare`: two evaluations of the same samples -> each benchmark's change, its paired
standard error, and the samples won and lost (eval_mm.compare, eval_mm.metrics.paired_change)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from eval_mm.compare import compare_runs
from eval_mm.metrics import CoverageError, paired_change

REPO = Path(__file__).resolve().parents[1]
BOX = [10, 10, 50, 50]  # every grounding target, in a 100 px image
RIGHT, WRONG = "<ref>it</ref><box>(100,100),(500,500)</box>", "<ref>it</ref><box>(600,600),(900,900)</box>"


def test_paired_change_by_hand():
    baseline = {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0}
    candidate = {"a": 1.0, "b": 1.0, "c": 0.0, "d": 1.0}
    r = paired_change(baseline, candidate)
    # differences 0, 1, -1, 1: mean 0.25, sample variance ((-.25)^2 + .75^2 + (-1.25)^2 + .75^2) / 3 = 11/12
    assert r["baseline"] == 50.0 and r["candidate"] == 75.0 and r["change"] == 25.0
    assert r["paired_se"] == pytest.approx(100 * math.sqrt(11 / 12 / 4))
    assert (r["won"], r["lost"], r["num_samples"]) == (2, 1, 4)


def test_paired_change_is_tighter_than_the_separate_errors_when_most_samples_agree():
    """The point of pairing: 100 samples both get right or wrong and 6 the candidate gains have a small
    standard error (sqrt(6)/n per sample), though each accuracy alone has one of about 5 points."""
    baseline = {str(i): float(i < 50) for i in range(100)}
    candidate = {**baseline, **{str(i): 1.0 for i in range(50, 56)}}
    r = paired_change(baseline, candidate)
    assert r["change"] == pytest.approx(6.0)
    assert r["paired_se"] == pytest.approx(100 * math.sqrt((6 * 0.94**2 + 94 * 0.06**2) / 99 / 100))
    assert r["paired_se"] < 2.5 < 100 * math.sqrt(0.5 * 0.5 / 100)


def test_paired_change_refuses_different_samples():
    with pytest.raises(CoverageError, match="different samples"):
        paired_change({"a": 1.0, "b": 0.0}, {"a": 1.0, "c": 0.0}, where="synth_vqa")


def write_benchmarks(root: Path) -> None:
    """A grounding, a preference and a caption benchmark of four samples under root/synthetic."""
    world = root / "synthetic"
    world.mkdir(parents=True)
    (world / "grounding_test.jsonl").write_text(
        "".join(
            json.dumps({"image": f"{i}.png", "sent": "it", "bbox": BOX, "width": 100, "height": 100}) + "\n"
            for i in range(4)
        )
    )
    (world / "dpo_test.json").write_text(
        json.dumps(
            [
                {
                    "id": f"p{i}",
                    "conversations": [{"from": "user", "value": f"<img>{i}.png</img>Q?"}],
                    "chosen": {"from": "assistant", "value": "yes"},
                    "rejected": {"from": "assistant", "value": "no"},
                }
                for i in range(4)
            ]
        )
    )
    (world / "caption_test.json").write_text(
        json.dumps(
            {
                "images": [{"id": i, "image": f"{i}.png"} for i in range(4)],
                "annotations": [{"id": i, "image_id": i, "caption": "a shape."} for i in range(4)],
            }
        )
    )


def write_eval(run: Path, grounding: list[str], margins: list[float]) -> Path:
    """What `eval_mm run --out run` writes: a predictions.jsonl per benchmark."""
    predictions = {
        "synth_grounding": dict(zip(map(str, range(4)), grounding, strict=True)),
        "synth_preference": {f"p{i}": m for i, m in enumerate(margins)},
        "synth_caption": {str(i): "a shape." for i in range(4)},
    }
    for bench, preds in predictions.items():
        (run / bench).mkdir(parents=True)
        (run / bench / "predictions.jsonl").write_text(
            "".join(json.dumps({"id": k, "prediction": p}) + "\n" for k, p in preds.items())
        )
    return run


def test_compare_runs_scores_every_sample_of_both_runs(tmp_path):
    write_benchmarks(tmp_path / "data")
    sft = write_eval(tmp_path / "sft", [RIGHT, WRONG, WRONG, RIGHT], [1.0, -1.0, 2.0, -0.5])
    dpo = write_eval(tmp_path / "dpo", [RIGHT, RIGHT, RIGHT, WRONG], [3.0, 0.5, 1.0, -1.5])
    r = compare_runs(sft, dpo, tmp_path / "data")
    assert list(r) == ["synth_caption", "synth_grounding", "synth_preference"]
    assert "not a mean over samples" in r["synth_caption"]["skipped"]
    g = r["synth_grounding"]
    assert (g["baseline"], g["candidate"], g["change"], g["won"], g["lost"]) == (50.0, 75.0, 25.0, 2, 1)
    # right (margin > 0): 2 of 4 -> 3 of 4; margins grew on pairs 0 and 1 (+2, +1.5), fell on 2 and 3 (-1, -1)
    p = r["synth_preference"]
    assert (p["baseline"], p["candidate"], p["won"], p["lost"]) == (50.0, 75.0, 1, 0)
    assert p["reward_accuracy"] == 50.0 and p["mean_margin_change"] == pytest.approx((2 + 1.5 - 1 - 1) / 4)


def run_compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "eval_mm", "compare", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_compare_cli_prints_a_table_or_json(tmp_path):
    write_benchmarks(tmp_path / "data")
    sft = write_eval(tmp_path / "sft", [RIGHT, WRONG, WRONG, RIGHT], [1.0, -1.0, 2.0, -0.5])
    dpo = write_eval(tmp_path / "dpo", [RIGHT, RIGHT, RIGHT, WRONG], [3.0, 0.5, 1.0, -1.5])
    table = run_compare(
        str(sft), str(dpo), "--data-root", str(tmp_path / "data"), "--bench", "synth_grounding"
    )
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split()[:4] == ["benchmark", "samples", "baseline", "candidate"]
    assert row.split()[:5] == ["synth_grounding", "4", "50.0", "75.0", "+25.0"]
    out = run_compare(str(sft), str(dpo), "--data-root", str(tmp_path / "data"), "--json")
    assert json.loads(out.stdout)["synth_preference"]["reward_accuracy"] == 50.0


def test_compare_cli_refuses_runs_of_other_samples_in_one_line(tmp_path):
    write_benchmarks(tmp_path / "data")
    sft = write_eval(tmp_path / "sft", [RIGHT, WRONG, WRONG, RIGHT], [1.0, -1.0, 2.0, -0.5])
    short = tmp_path / "short" / "synth_grounding"
    short.mkdir(parents=True)
    (short / "predictions.jsonl").write_text(json.dumps({"id": "0", "prediction": RIGHT}) + "\n")
    out = run_compare(str(sft), str(tmp_path / "short"), "--data-root", str(tmp_path / "data"))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: synth_grounding (")
    assert "scored different samples" in out.stderr
    missing = run_compare(str(sft), str(tmp_path / "nowhere"), "--data-root", str(tmp_path / "data"))
    assert missing.returncode == 2 and "evaluation folder not found" in missing.stderr
