"""End to end on CPU: a tiny checkpoint evaluated on tiny synthetic sets, single process and 2-process
gloo under torchrun (identical metrics), resume, in-process API, and bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SYNTH_BENCHES = "synth_caption,synth_vqa,synth_grounding,synth_mc"
N_EVAL = 5


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from data.synthetic import generate

    root = tmp_path_factory.mktemp("eval_data")
    generate(root / "synthetic", seed=0, n_train=4, n_eval=N_EVAL, image_size=56, vocab_size=300)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_vlm):
    path = tmp_path_factory.mktemp("ckpt")
    tiny_vlm.save_pretrained(path)
    return path


def run_cli(*args: str, nproc: int = 1) -> dict:
    launcher = (
        [sys.executable, "-m", "eval_mm"]
        if nproc == 1
        else [
            str(Path(sys.executable).parent / "torchrun"),
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "eval_mm",
        ]
    )
    out = subprocess.run(
        [*launcher, "run", *args, "--num-workers", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def strip_resume_counts(results: dict) -> dict:
    return {b: {k: v for k, v in m.items() if k != "num_resumed"} for b, m in results.items()}


@pytest.mark.slow
def test_single_process_then_resume_then_two_process_gloo(checkpoint, data_root, tmp_path):
    common = [
        "--checkpoint",
        str(checkpoint),
        "--bench",
        SYNTH_BENCHES,
        "--data-root",
        str(data_root),
        "--batch-size",
        "2",
    ]
    single = run_cli(*common, "--out", str(tmp_path / "single"))
    assert set(single) == set(SYNTH_BENCHES.split(","))
    for metrics in single.values():
        assert metrics["num_samples"] == N_EVAL and metrics["num_resumed"] == 0
    records = [
        json.loads(line)
        for line in (tmp_path / "single/synth_vqa/predictions.jsonl").read_text().splitlines()
    ]
    assert [r["id"] for r in records] == [str(i) for i in range(N_EVAL)]
    assert all("Answer:" in r["prompt"] and isinstance(r["raw_output"], str) for r in records)
    mc = [
        json.loads(line) for line in (tmp_path / "single/synth_mc/predictions.jsonl").read_text().splitlines()
    ]
    assert all(r["prediction"] in "ABCDE" and len(r["option_losses"]) >= 2 for r in mc)

    resumed = run_cli(*common, "--out", str(tmp_path / "single"))
    assert all(m["num_resumed"] == N_EVAL for m in resumed.values())
    assert strip_resume_counts(resumed) == strip_resume_counts(single)

    two = run_cli(*common, "--out", str(tmp_path / "two"), nproc=2)
    assert strip_resume_counts(two) == strip_resume_counts(single)
    for bench in SYNTH_BENCHES.split(","):
        one = [
            json.loads(line)
            for line in (tmp_path / "single" / bench / "predictions.jsonl").read_text().splitlines()
        ]
        two_ = [
            json.loads(line)
            for line in (tmp_path / "two" / bench / "predictions.jsonl").read_text().splitlines()
        ]
        # Same samples, same order, same outputs. Option losses are compared to float tolerance: a shard
        # pads its batches differently, which moves the last bits of a float32 cross-entropy.
        for a, b in zip(one, two_, strict=True):
            losses_a, losses_b = a.pop("option_losses", None), b.pop("option_losses", None)
            assert a == b
            if losses_a is not None:
                assert losses_b == pytest.approx(losses_a, rel=1e-5)
        assert not list((tmp_path / "two" / bench).glob("predictions.part*"))


def test_in_process_api_is_independent_of_batch_size_and_resumes_partial_runs(
    tiny_vlm, tiny_tokenizer, data_root, tmp_path
):
    from eval_mm.runner import evaluate

    benches = ["synth_vqa", "synth_mc"]
    by_one = evaluate(
        tiny_vlm, tiny_tokenizer, benches, data_root, tmp_path / "a", batch_size=1, progress=False
    )
    # Batches of 3 (the loader sorts prompts by length, the last batch is short) with the static KV cache,
    # and all 5 in one batch: the same predictions, option losses and metrics, in dataset order.
    for name, batch_size, static_cache in (("b", 3, True), ("c", N_EVAL, False)):
        other = evaluate(
            tiny_vlm,
            tiny_tokenizer,
            benches,
            data_root,
            tmp_path / name,
            batch_size=batch_size,
            static_cache=static_cache,
            progress=False,
        )
        assert strip_resume_counts(other) == strip_resume_counts(by_one)
        for bench in benches:
            records_a = [
                json.loads(x) for x in (tmp_path / "a" / bench / "predictions.jsonl").read_text().splitlines()
            ]
            records_b = [
                json.loads(x)
                for x in (tmp_path / name / bench / "predictions.jsonl").read_text().splitlines()
            ]
            assert [r["id"] for r in records_b] == [str(i) for i in range(N_EVAL)]
            assert [r["prediction"] for r in records_a] == [r["prediction"] for r in records_b]
            if bench == "synth_mc":
                for a, b in zip(records_a, records_b, strict=True):
                    assert b["option_losses"] == pytest.approx(a["option_losses"], rel=1e-5)

    # An interrupted run: 2 predictions in a part file (last line truncated) -> only the rest is predicted.
    partial = tmp_path / "d" / "synth_vqa"
    partial.mkdir(parents=True)
    lines = (tmp_path / "a" / "synth_vqa" / "predictions.jsonl").read_text().splitlines()
    (partial / "predictions.part0.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
    (partial / "run_info.json").write_text(json.dumps({"prompt_format": "raw"}))
    resumed = evaluate(tiny_vlm, tiny_tokenizer, ["synth_vqa"], data_root, tmp_path / "d", progress=False)
    assert resumed["synth_vqa"]["num_resumed"] == 2
    assert (partial / "predictions.jsonl").read_text().splitlines() == lines


def test_limit_and_prompt_format_mismatch(tiny_vlm, tiny_tokenizer, data_root, tmp_path):
    from eval_mm.runner import evaluate

    out = evaluate(
        tiny_vlm, tiny_tokenizer, ["synth_grounding"], data_root, tmp_path, limit=2, progress=False
    )
    assert out["synth_grounding"]["num_samples"] == 2
    with pytest.raises(ValueError, match="prompt format 'raw', not 'chatml'"):
        evaluate(
            tiny_vlm,
            tiny_tokenizer,
            ["synth_grounding"],
            data_root,
            tmp_path,
            limit=2,
            prompt_format="chatml",
            progress=False,
        )


def test_chatml_prompts_run(tiny_vlm, tiny_tokenizer, data_root, tmp_path):
    from eval_mm.runner import evaluate

    out = evaluate(
        tiny_vlm,
        tiny_tokenizer,
        ["synth_mc", "synth_caption"],
        data_root,
        tmp_path,
        limit=2,
        prompt_format="chatml",
        progress=False,
    )
    assert out["synth_mc"]["num_samples"] == 2
    first = json.loads((tmp_path / "synth_caption" / "predictions.jsonl").read_text().splitlines()[0])
    assert first["prompt"].startswith("<|im_start|>system\n") and first["prompt"].endswith(
        "<|im_start|>assistant\n"
    )


def test_missing_data_file_names_the_expected_path(tiny_vlm, tiny_tokenizer, tmp_path):
    from eval_mm.runner import evaluate

    with pytest.raises(FileNotFoundError, match=r"expected .*vqav2/vqav2_val.jsonl"):
        evaluate(tiny_vlm, tiny_tokenizer, ["vqav2_val"], tmp_path, tmp_path / "out", progress=False)


def test_checkpoint_without_tokenizer_is_a_clear_error(checkpoint, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(checkpoint, bare)
    (bare / "manifest.json").unlink(missing_ok=True)  # written by other code: no manifest that lists them
    for file in bare.iterdir():
        if file.name.startswith(
            ("tokenizer", "special_tokens", "vocab", "merges", "added_tokens", "chat_template")
        ):
            file.unlink()
    from models import load_pretrained
    from models.errors import UserError

    with pytest.raises(UserError, match="the export has no tokenizer"):
        load_pretrained(bare)
