"""Every command-line tool reports a user's mistake the same way (models/errors.py): the last line of stderr
is ``error: ...`` naming the file and the record (or the key, or the argument), the exit status is 2, and
there is no traceback, unless ``--debug`` or ``VLRECIPE_DEBUG=1`` asks for one.

Each case runs the real CLI in a subprocess on tiny inputs; most fail before any model is built.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TINY_PRETRAIN = str(REPO / "recipes" / "tiny" / "pretrain.yaml")


@dataclass(frozen=True)
class Case:
    argv: list[str]  # after `python`
    expect: list[str]  # substrings of the error line


def run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "VLRECIPE_DEBUG"}
    full_env.update({"PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    return subprocess.run(
        [sys.executable, *argv], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300
    )


def write_image(path: Path, color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), color).save(path)
    return path


def chat(user: str, answer: str = "it is red") -> dict:
    return {"conversations": [{"from": "user", "value": user}, {"from": "assistant", "value": answer}]}


def write_vqa_root(root: Path, records: list[dict] | str) -> Path:
    """A data root holding the synth_vqa benchmark files (images under root/synthetic/images)."""
    folder = root / "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    text = records if isinstance(records, str) else "".join(json.dumps(r) + "\n" for r in records)
    (folder / "vqa_test.jsonl").write_text(text)
    (folder / "vqa_test_annotations.json").write_text(
        json.dumps({"annotations": [{"question_id": 0, "answers": [{"answer": "red"}]}]})
    )
    return root


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> SimpleNamespace:
    """Tiny inputs, good and bad, for every CLI."""
    from models import build_vlm, presets
    from tests.conftest import build_tiny_tokenizer, write_tiny_tiktoken
    from tests.test_convert_qwenvl import tiny_qwen_config

    t = tmp_path_factory.mktemp("cli_errors")
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(t / "tokenizer")
    for i in range(4):
        write_image(t / "images" / f"{i}.png", color=(60 * i, 30, 30))
    (t / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    good = [chat(f"<img>images/{i}.png</img>What colour?") for i in range(4)]

    def data(name: str, records) -> str:
        (t / name).write_text(records if isinstance(records, str) else json.dumps(records))
        return str(t / name)

    torch.manual_seed(0)
    model = build_vlm(presets.tiny(vocab_size=len(tokenizer)), tokenizer=tokenizer)
    model.save_pretrained(t / "ckpt")

    question = {"image": "images/0.png", "question": "What colour?", "question_id": 0}
    write_image(t / "root_ok" / "synthetic" / "images" / "0.png")
    write_vqa_root(t / "root_ok", [question])
    (t / "root_corrupt" / "synthetic" / "images").mkdir(parents=True)
    (t / "root_corrupt" / "synthetic" / "images" / "0.png").write_bytes(b"garbage, not an image")
    write_vqa_root(t / "root_corrupt", [question])
    write_vqa_root(t / "root_no_image", [{**question, "image": "images/absent.png"}])
    write_image(t / "root_bad_record" / "synthetic" / "images" / "0.png")
    write_vqa_root(t / "root_bad_record", [{"image": "images/0.png", "question_id": 0}])

    (t / "qwen_not_vl").mkdir()
    (t / "qwen_not_vl" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    write_tiny_tiktoken(t / "qwen_not_vl" / "qwen.tiktoken")
    (t / "qwen_corrupt").mkdir()
    (t / "qwen_corrupt" / "config.json").write_text(json.dumps(tiny_qwen_config()))
    write_tiny_tiktoken(t / "qwen_corrupt" / "qwen.tiktoken")
    (t / "qwen_corrupt" / "pytorch_model.bin").write_bytes(b"half a download")

    (t / "preds.jsonl").write_text('{"id": 0, "prediction": "red"}\n{"id": 1}\n')
    (t / "a_file").write_text("not a folder")
    (t / "bad.yaml").write_text("model: {preset: tiny\ntrain: [")
    return SimpleNamespace(
        t=t,
        tok=str(t / "tokenizer"),
        ckpt=str(t / "ckpt"),
        good=data("good.json", good),
        bad_role=data("bad_role.json", [good[0], {"conversations": [{"from": "robot", "value": "hi"}]}]),
        bad_json=data("bad_json.json", '[{"conversations": [}]'),
        bad_box=data(
            "bad_box.jsonl",
            "\n".join(
                json.dumps(r)
                for r in [
                    {"task": "grounding", "image": "images/0.png", "ref": "dot", "box": [10, 20, 5, 30]}
                ]
            )
            + "\n",
        ),
        missing_image=data("missing_image.json", good + [chat("<img>images/nope.png</img>What colour?")]),
        corrupt_image=data("corrupt_image.json", good + [chat("<img>images/corrupt.png</img>What colour?")]),
    )


def train_args(w, *overrides: str, data: str | None = None) -> list[str]:
    """The loader's own errors: data.check=off, because the start-up check (on by default) reports the same
    mistakes first, as one summary line naming the first bad record (tests/test_train_data_check.py)."""
    return [
        "-m",
        "train",
        TINY_PRETRAIN,
        f"model.tokenizer_path={w.tok}",
        f"data.paths=[{data or w.good}]",
        f"checkpoint.out_dir={w.t / 'run'}",
        "train.steps=1",
        "data.check=off",
        *overrides,
    ]


def eval_args(w, root: str = "root_ok", *extra: str, checkpoint: str | None = None) -> list[str]:
    return [
        "-m",
        "eval_mm",
        "run",
        "--checkpoint",
        checkpoint or w.ckpt,
        "--bench",
        "synth_vqa",
        "--data-root",
        str(w.t / root),
        "--out",
        str(w.t / f"out_{root}"),
        "--num-workers",
        "0",
        *extra,
    ]


# name -> (w -> Case). Each names the mistake a user makes and what the error line must say.
CASES = {
    # python -m train
    "train: no recipe given": lambda w: Case(["-m", "train"], ["python -m train", "required: recipe"]),
    "train: recipe file missing": lambda w: Case(
        ["-m", "train", str(w.t / "nope.yaml")], ["nope.yaml", "not found"]
    ),
    "train: recipe is not YAML": lambda w: Case(
        ["-m", "train", str(w.t / "bad.yaml")], ["bad.yaml", "not valid YAML"]
    ),
    "train: misspelt recipe key": lambda w: Case(
        train_args(w, "optim.lrr=1"), ["pretrain.yaml", "unknown key 'optim.lrr'", "did you mean 'optim.lr'"]
    ),
    "train: data file missing": lambda w: Case(
        train_args(w, data=str(w.t / "nope.json")), ["data file not found", "nope.json"]
    ),
    "train: malformed JSON": lambda w: Case(
        train_args(w, data=w.bad_json), ["bad_json.json", "malformed JSON at line 1"]
    ),
    "train: malformed chat record": lambda w: Case(
        train_args(w, data=w.bad_role), ["bad_role.json record 1", "role 'robot'"]
    ),
    "train: malformed task record": lambda w: Case(
        train_args(w, data=w.bad_box), ["bad_box.jsonl line 1", "box corners out of order"]
    ),
    "train: missing image": lambda w: Case(
        train_args(w, data=w.missing_image),
        ["1 image files are missing", "nope.png (", "missing_image.json record 4", "data.max_bad_images=0"],
    ),
    "train: corrupt image (found in a DataLoader worker)": lambda w: Case(
        train_args(w, "data.num_workers=1", data=w.corrupt_image),
        ["cannot decode image", "corrupt.png", "corrupt_image.json record 4", "data.max_bad_images=0"],
    ),
    "train: missing checkpoint": lambda w: Case(
        train_args(w, f"model.init_from={w.t / 'no_ckpt'}"),
        ["model.init_from=", "no_ckpt", "no such file or directory"],
    ),
    "train: checkpoint folder without a model": lambda w: Case(
        train_args(w, f"model.init_from={w.t / 'images'}"), ["images", "config.json"]
    ),
    "train: missing tokenizer": lambda w: Case(
        train_args(w, f"model.tokenizer_path={w.t / 'no_tok'}"), ["model.tokenizer_path=", "no_tok"]
    ),
    "train: wrong benchmark name": lambda w: Case(
        train_args(w, "eval.benches=[synth_vqaa]", f"eval.data_root={w.t}"),
        ["unknown benchmark 'synth_vqaa'", "synth_vqa"],
    ),
    # python -m eval_mm
    "eval run: bad --batch-size": lambda w: Case(
        eval_args(w, "root_ok", "--batch-size", "0"), ["argument --batch-size", "must be >= 1"]
    ),
    "eval run: wrong benchmark name": lambda w: Case(
        [
            "-m",
            "eval_mm",
            "run",
            "--checkpoint",
            w.ckpt,
            "--bench",
            "synth_vqaa",
            "--data-root",
            str(w.t),
            "--out",
            str(w.t / "o"),
        ],
        ["unknown benchmark 'synth_vqaa'"],
    ),
    "eval run: missing checkpoint": lambda w: Case(
        eval_args(w, checkpoint=str(w.t / "no_ckpt")), ["no_ckpt", "not found"]
    ),
    "eval run: missing benchmark file": lambda w: Case(
        eval_args(w, "images"), ["synth_vqa", "data file not found", "synthetic/vqa_test.jsonl"]
    ),
    "eval run: malformed record": lambda w: Case(
        eval_args(w, "root_bad_record"), ["vqa_test.jsonl record 0", "missing field 'question'"]
    ),
    "eval run: missing image": lambda w: Case(
        eval_args(w, "root_no_image"), ["vqa_test.jsonl record 0", "image not found", "images/absent.png"]
    ),
    "eval run: corrupt image (found in a DataLoader worker)": lambda w: Case(
        eval_args(w, "root_corrupt") + ["--num-workers", "1"],
        ["cannot decode image", "images/0.png", "synth_vqa sample 0 of synthetic/vqa_test.jsonl"],
    ),
    "eval score: wrong benchmark name": lambda w: Case(
        ["-m", "eval_mm", "score", "--bench", "vqa", "--predictions", "p", "--annotations", "a"],
        ["unknown benchmark 'vqa'", "vqav2_val"],
    ),
    "eval score: missing predictions": lambda w: Case(
        [
            "-m",
            "eval_mm",
            "score",
            "--bench",
            "synth_vqa",
            "--predictions",
            str(w.t / "no_preds.jsonl"),
            "--annotations",
            str(w.t / "root_ok" / "synthetic" / "vqa_test_annotations.json"),
        ],
        ["predictions file not found", "no_preds.jsonl"],
    ),
    "eval score: malformed prediction": lambda w: Case(
        [
            "-m",
            "eval_mm",
            "score",
            "--bench",
            "synth_vqa",
            "--predictions",
            str(w.t / "preds.jsonl"),
            "--annotations",
            str(w.t / "root_ok" / "synthetic" / "vqa_test_annotations.json"),
        ],
        ["preds.jsonl line 2", "'prediction'"],
    ),
    # python -m models.convert_qwenvl
    "convert: missing source": lambda w: Case(
        ["-m", "models.convert_qwenvl", str(w.t / "no_src"), str(w.t / "c")], ["no_src", "no config.json"]
    ),
    "convert: not a Qwen-VL config": lambda w: Case(
        ["-m", "models.convert_qwenvl", str(w.t / "qwen_not_vl"), str(w.t / "c")],
        ["qwen_not_vl/config.json", "not a Qwen-VL config"],
    ),
    "convert: corrupt weights": lambda w: Case(
        ["-m", "models.convert_qwenvl", str(w.t / "qwen_corrupt"), str(w.t / "c")],
        ["pytorch_model.bin", "cannot read the weights"],
    ),
    "convert: bad --dtype": lambda w: Case(
        ["-m", "models.convert_qwenvl", "a", "b", "--dtype", "fp8"],
        ["argument --dtype", "invalid choice: 'fp8'"],
    ),
    # python -m models.export_qwenvl, python -m eval_mm chat
    "export: source is not an export": lambda w: Case(
        ["-m", "models.export_qwenvl", str(w.t / "no_src"), str(w.t / "e")],
        ["no_src/config.json", "not found"],
    ),
    "chat: missing checkpoint": lambda w: Case(
        ["-m", "eval_mm", "chat", "--checkpoint", str(w.t / "no_ckpt"), "--prompt", "hi"],
        ["checkpoint not found", "no_ckpt"],
    ),
    "chat: bad --max-new-tokens": lambda w: Case(
        ["-m", "eval_mm", "chat", "--checkpoint", w.ckpt, "--max-new-tokens", "0"],
        ["argument --max-new-tokens", "must be >= 1"],
    ),
    # python -m data.synthetic
    "synthetic: --n-train 0": lambda w: Case(
        ["-m", "data.synthetic", "--out", str(w.t / "s"), "--n-train", "0"],
        ["argument --n-train", "must be >= 1"],
    ),
    "synthetic: --out is a file": lambda w: Case(
        ["-m", "data.synthetic", "--out", str(w.t / "a_file")],
        ["--out", "a_file", "cannot create the folder"],
    ),
    # the benchmarks and smoke tests
    "bench_loader: --data missing": lambda w: Case(
        ["-m", "data.bench_loader", "--data", str(w.t / "no_world")], ["--data", "no_world", "no such folder"]
    ),
    "smoke_full_scale: --seq too short": lambda w: Case(
        ["-m", "models.smoke_full_scale", "--tiny", "--device", "cpu", "--seq", "8"],
        ["--seq must be at least"],
    ),
    "bench_throughput: --batches 0": lambda w: Case(
        ["-m", "eval_mm.bench_throughput", "--batches", "0"], ["argument --batches", "must be >= 1"]
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_user_mistake_prints_one_error_line_and_exits_2(w, name):
    case = CASES[name](w)
    proc = run(case.argv)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, f"{name}: status {proc.returncode}\n{proc.stderr[-3000:]}"
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    for part in case.expect:
        assert part in lines[-1], f"{part!r} not in {lines[-1]!r}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


# One mistake per CLI with the traceback asked for: the user error propagates as a normal exception.
DEBUG_CASES = [
    "train: misspelt recipe key",
    "train: corrupt image (found in a DataLoader worker)",
    "eval run: missing image",
    "convert: not a Qwen-VL config",
    "synthetic: --n-train 0",
]


@pytest.mark.parametrize("name", DEBUG_CASES)
def test_debug_shows_the_traceback(w, name):
    case = CASES[name](w)
    proc = run([*case.argv, "--debug"])
    assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr, proc.stderr[-3000:]
    assert not proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_vlrecipe_debug_env_shows_the_traceback(w):
    proc = run(CASES["train: missing image"](w).argv, {"VLRECIPE_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr
    assert "ImageLoadError" in proc.stderr


def reraised_as_from_a_worker(error: Exception) -> Exception:
    """What the main process catches when a DataLoader worker raised ``error``."""
    from torch._utils import ExceptionWrapper

    try:
        raise error
    except Exception:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    try:
        wrapper.reraise()
    except Exception as e:
        return e


def test_a_worker_error_is_reported_with_its_own_message():
    """torch re-raises a DataLoader worker's exception with the worker's traceback as the message; the
    error line keeps only the original message."""
    from data.formats import DataFormatError
    from eval_mm.benchmarks import UnknownBenchmarkError
    from models.errors import user_message

    error = reraised_as_from_a_worker(DataFormatError("train.json record 3: turn 1 has role 'robot'"))
    assert isinstance(error, DataFormatError) and "Original Traceback" in str(error)
    assert user_message(error) == "train.json record 3: turn 1 has role 'robot'"
    error = reraised_as_from_a_worker(UnknownBenchmarkError("unknown benchmark 'nope'"))
    assert isinstance(error, KeyError) and user_message(error) == "unknown benchmark 'nope'"


@pytest.mark.slow
@pytest.mark.parametrize("mistake", ["every rank: a missing image", "one rank: a corrupt image"])
def test_under_torchrun_a_mistake_stops_every_rank_without_a_hang(w, mistake):
    """A missing file is found when the data loads, identically on every rank: each prints its error line
    and exits. A corrupt image is found by the one rank that reads it (record 4 is rank 0's third sample
    without shuffling) while the other waits in the step's all-reduce: torchrun stops that one."""
    from tests.test_train_world import subprocess_env, torchrun_cmd

    data, expect = (
        (w.missing_image, "error: 1 image files are missing")
        if mistake.startswith("every")
        else (w.corrupt_image, "error: cannot decode image")
    )
    args = train_args(
        w,
        "data.shuffle=false",
        "train.micro_batch=1",
        "train.steps=3",
        "data.num_workers=0",
        f"checkpoint.out_dir={w.t / ('ddp_' + mistake[:3])}",
        data=data,
    )[2:]
    proc = subprocess.run(
        torchrun_cmd(2, *args), cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode != 0
    assert expect in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count(expect) == (2 if mistake.startswith("every") else 1)
