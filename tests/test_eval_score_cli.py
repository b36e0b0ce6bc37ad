"""`python -m eval_mm score`: reference-format annotations + predictions JSONL -> metrics on the last line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_score(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "eval_mm", "score", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_score_vqa_official_annotations(tmp_path):
    annotations = tmp_path / "ann.json"
    annotations.write_text(
        json.dumps(
            {
                "annotations": [
                    {"question_id": 1, "answers": [{"answer": "2", "answer_id": i} for i in range(10)]},
                    {"question_id": 2, "answers": [{"answer": "yes", "answer_id": i} for i in range(10)]},
                ]
            }
        )
    )
    preds = write_jsonl(
        tmp_path / "p.jsonl", [{"id": "1", "prediction": "two"}, {"id": "2", "prediction": "no"}]
    )
    out = run_score("--bench", "vqav2_val", "--predictions", str(preds), "--annotations", str(annotations))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"vqa_accuracy": 50.0, "num_samples": 2}


def test_score_chartqa_order_flag(tmp_path):
    ann = write_jsonl(tmp_path / "test_human.jsonl", [{"image": "x.png", "question": "q", "answer": "100"}])
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "0", "prediction": "95.2"}])
    args = ["--bench", "chartqa_test_human", "--predictions", str(preds), "--annotations", str(ann)]
    assert json.loads(run_score(*args).stdout.splitlines()[-1])["relaxed_accuracy"] == 100.0
    assert (
        json.loads(run_score(*args, "--chartqa-reference-order").stdout.splitlines()[-1])["relaxed_accuracy"]
        == 0.0
    )


def test_score_refcoco_box_divisor(tmp_path):
    ann = write_jsonl(
        tmp_path / "refcoco_val.jsonl",
        [{"image": "x.jpg", "sent": "dog", "bbox": [0, 0, 500, 1000], "width": 1000, "height": 1000}],
    )
    # /1000 -> (0,0,250,999): IoU 249750/500000 = 0.4995, a miss; /999 -> (0,0,250.25,1000): 0.5005, a hit
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "0", "prediction": "(0,0),(250,999)"}])
    args = ["--bench", "refcoco_val", "--predictions", str(preds), "--annotations", str(ann)]
    out = json.loads(run_score(*args).stdout.splitlines()[-1])
    assert out == {"accuracy_iou0.5": 0.0, "num_unparsable": 0, "num_samples": 1}
    out = json.loads(run_score(*args, "--box-divisor", "999").stdout.splitlines()[-1])
    assert out["accuracy_iou0.5"] == 100.0


def test_score_missing_ids_is_a_clear_error(tmp_path):
    ann = write_jsonl(tmp_path / "test.jsonl", [{"image": "a", "question": "q", "answer": "x"}] * 3)
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "0", "prediction": "x"}])
    out = run_score("--bench", "ai2diagram_test", "--predictions", str(preds), "--annotations", str(ann))
    assert out.returncode != 0
    assert "2 annotation ids have no prediction (e.g. ['1', '2'])" in out.stderr


def test_score_missing_annotation_file_names_it(tmp_path):
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "0", "prediction": "x"}])
    out = run_score(
        "--bench", "gqa_testdev", "--predictions", str(preds), "--annotations", str(tmp_path / "nope.jsonl")
    )
    assert out.returncode != 0 and "nope.jsonl" in out.stderr


def test_score_mmbench_circular(tmp_path):
    rows = [
        {"index": 3, "image": "i", "question": "q", "choices": ["a", "b"], "answer": 0},
        {"index": 1000003, "image": "i", "question": "q", "choices": ["b", "a"], "answer": 1},
    ]
    ann = write_jsonl(tmp_path / "mmbench.jsonl", rows)
    preds = write_jsonl(
        tmp_path / "p.jsonl", [{"id": "3", "prediction": "A"}, {"id": "1000003", "prediction": "A"}]
    )
    out = json.loads(
        run_score(
            "--bench", "mmbench_dev", "--predictions", str(preds), "--annotations", str(ann)
        ).stdout.splitlines()[-1]
    )
    assert out["circular_accuracy"] == 0.0 and out["accuracy"] == 50.0 and out["num_questions"] == 1


def test_list_names_files_and_metrics():
    out = subprocess.run(
        [sys.executable, "-m", "eval_mm", "list"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0
    assert "refcoco+_testA" in out.stdout and "docvqa/val/val_v1.0.json" in out.stdout


@pytest.mark.parametrize(
    "bench", ["synth_caption", "synth_vqa", "synth_grounding", "synth_mc", "mme", "seed_bench_img"]
)
def test_every_bench_has_a_metric_and_loader(bench):
    from eval_mm.benchmarks import get_benchmark
    from eval_mm.metrics import METRICS

    assert get_benchmark(bench).metric in METRICS
