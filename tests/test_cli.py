"""The `vlrecipe` command (train/cli.py): one verb per tool, each the same function as its `python -m` module.

The command runs here as `python -m train.cli` (what the console script calls; CI's `pip install -e .` also
creates the script, checked when it is on PATH).
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models.errors import UserError
from train import demo
from train.cli import VERBS, main

REPO = Path(__file__).resolve().parents[1]
EVAL_SUBCOMMANDS = ["run", "score", "list", "compare", "chat"]


def run(*argv: str, command: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("VLRECIPE_DEBUG", None)
    return subprocess.run(
        [*(command or [sys.executable, "-m", "train.cli"]), *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def help_of(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_verb_with_its_line_and_loads_no_torch():
    result = run("--help")
    assert result.returncode == 0
    for name, verb in VERBS.items():
        assert f"  {name}" in result.stdout and verb.summary in result.stdout, name
    probe = "\n".join(
        [
            "import sys",
            "from train.cli import main",
            "try:",
            "    main(['--help'])",
            "except SystemExit:",
            "    pass",
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))",
        ]
    )
    loaded = run(command=[sys.executable, "-c", probe])
    assert loaded.stdout.splitlines()[-1] == "[]", loaded.stderr


def test_eval_list_score_and_compare_load_no_torch(tmp_path):
    """Scoring saved predictions needs no model: `vlrecipe eval list` and `eval score` run without importing
    torch or transformers (0.2 s instead of 6 s here); `eval run` and `chat` import them when they run."""
    from data.synthetic import generate
    from eval_mm.benchmarks import get_benchmark
    from eval_mm.datasets import load_references

    generate(tmp_path / "synthetic", seed=0, n_train=4, n_eval=6, image_size=56, vocab_size=300)
    bench = get_benchmark("synth_vqa")
    annotations = tmp_path / bench.annotation_file
    predictions = tmp_path / "predictions.jsonl"
    ids = sorted(load_references(bench, annotations))
    predictions.write_text("".join(f'{{"id": "{i}", "prediction": "no"}}\n' for i in ids))
    score = ["eval", "score", "--bench", "synth_vqa", "--predictions", str(predictions)]
    probe = "\n".join(
        [
            "import sys",
            "from train.cli import main",
            "main(['eval', 'list'])",
            f"main({[*score, '--annotations', str(annotations)]!r})",
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))",
        ]
    )
    result = run(command=[sys.executable, "-c", probe])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("synth_vqa") for line in lines)  # the list
    assert json.loads(lines[-2]) == {"vqa_accuracy": 0.0, "num_samples": 6}  # the score: every answer wrong
    assert lines[-1] == "[]", result.stdout


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_has_help_with_an_example(verb, capsys):
    text = help_of([verb, "--help"], capsys)
    assert f"usage: vlrecipe {verb} " in text
    examples = text[text.rindex("\nexample") :]
    assert f"\n  vlrecipe {verb}" in examples, text


@pytest.mark.parametrize("subcommand", EVAL_SUBCOMMANDS)
def test_every_eval_subcommand_has_help_with_an_example(subcommand, capsys):
    text = help_of(["eval", subcommand, "--help"], capsys)
    assert f"usage: vlrecipe eval {subcommand}" in text
    assert f"\n  vlrecipe eval {subcommand}" in text[text.rindex("\nexample") :]


def test_an_unknown_verb_is_one_error_line_and_status_2():
    result = run("trian", "recipes/sft.yaml")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [result.stderr.splitlines()[-1]], result.stderr
    assert "invalid choice: 'trian'" in errors[0]
    assert "Traceback" not in result.stderr


def test_a_verb_is_its_python_m_module(tmp_path):
    """The same world, byte for byte, and the same error line for the same mistake."""
    world = ["--seed", "3", "--n-train", "6", "--n-eval", "3", "--image-size", "32"]
    assert run("synth", "--out", str(tmp_path / "command"), *world).returncode == 0
    assert (
        run(
            "-m", "data.synthetic", "--out", str(tmp_path / "module"), *world, command=[sys.executable]
        ).returncode
        == 0
    )
    module_out = tmp_path / "module"
    files = sorted(str(p.relative_to(module_out)) for p in module_out.rglob("*") if p.is_file())
    assert len(files) > 10
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "command", module_out, files, shallow=False)
    assert (mismatch, errors) == ([], [])

    missing = str(tmp_path / "nope.yaml")
    by_command, by_module = run("train", missing), run("-m", "train", missing, command=[sys.executable])
    assert by_command.returncode == by_module.returncode == 2
    assert by_command.stderr.splitlines()[-1] == by_module.stderr.splitlines()[-1]
    assert "nope.yaml" in by_command.stderr


def test_chat_is_eval_chat():
    """`vlrecipe chat` is the chat subcommand of eval_mm, named as the user typed it."""
    result = run("chat", "--checkpoint", "runs/none", "--max-new-tokens", "0")
    assert result.returncode == 2
    expected = "error: vlrecipe chat: argument --max-new-tokens: must be >= 1, got 0"
    assert result.stderr.splitlines()[-1] == expected


def test_demo_runs_the_demo_script_with_this_interpreter(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        demo.subprocess,
        "run",
        lambda argv, env: calls.append((argv, env)) or subprocess.CompletedProcess(argv, 0),
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DPO", raising=False)
    assert demo.main(["out", "--dpo"]) == 0 and demo.main([]) == 0
    (argv, env), (default_argv, default_env) = calls
    assert argv == ["bash", str(REPO / "launch" / "demo.sh"), str(tmp_path / "out")]
    assert env["PYTHON"] == sys.executable and env["DPO"] == "1"
    assert default_argv[-1] == str(tmp_path / "runs" / "demo") and "DPO" not in default_env
    # --family: the script's own switch; families without a demo recipe, and DPO with a family, are refused
    assert demo.main(["out", "--family", "qwen2_5_vl"]) == 0
    assert calls[-1][0] == [
        "bash",
        str(REPO / "launch" / "demo.sh"),
        str(tmp_path / "out"),
        "--family",
        "qwen2_5_vl",
    ]
    for refused, message in (
        (["--family", "qwen9_vl"], "invalid choice: 'qwen9_vl'"),
        (["--family", "qwen2_5_vl", "--dpo"], "--family qwen2_5_vl has none"),
    ):
        with pytest.raises(UserError, match=message):
            demo.main(refused)
    assert len(calls) == 3


def test_the_console_script_is_the_command():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"vlrecipe": "train.cli:cli"}
    script = shutil.which("vlrecipe")
    if script is None:
        pytest.skip("no vlrecipe on PATH (pip install -e . creates it)")
    result = run("--help", command=[script])
    assert result.returncode == 0 and all(f"  {name}" in result.stdout for name in VERBS)
