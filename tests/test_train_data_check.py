"""The dataset check at trainer start-up (``data.check: off|fast|full``): bad data stops the run with one
``error:`` line before any model is built, on every rank; good data passes and leaves its report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_train_world import REPO, TINY, make_world, subprocess_env, torchrun_cmd, world_overrides


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The training tests' world plus bad_chat.json: its answers hold boxes outside [0, 1000)."""
    root = make_world(tmp_path_factory.mktemp("world"))
    chats = json.loads((root / "chat.json").read_text())
    for c in chats:
        c["conversations"][1]["value"] = "<ref>it</ref><box>(0,0),(1000,1000)</box>"
    (root / "bad_chat.json").write_text(json.dumps(chats))
    return root


def test_good_data_passes_and_leaves_its_report(world, tmp_path):
    from train.data_check import check_data_at_startup
    from train.recipe import load_recipe

    recipe = load_recipe(
        TINY / "pretrain.yaml", world_overrides(world, tmp_path, "chat.json") + ["log.progress_bar=false"]
    )
    check_data_at_startup(recipe, is_main=True, run_dir=tmp_path)
    report = json.loads((tmp_path / "data_check.json").read_text())
    assert report["result"]["passed"] and report["records"] == 8 and report["check"]["mode"] == "fast"
    assert report["data"]["num_image_tokens"] == 16  # tiny preset; the recipe names no init_from here

    recipe.data.check = "off"
    check_data_at_startup(recipe, is_main=True, run_dir=tmp_path / "off")
    assert not (tmp_path / "off").exists()


def failure_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_bad_data_stops_the_trainer_with_one_line_before_the_model_is_built(world, tmp_path):
    run = tmp_path / "run"
    args = [str(TINY / "pretrain.yaml"), *world_overrides(world, run, "bad_chat.json")]
    proc = subprocess.run(
        [sys.executable, "-m", "train", *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = failure_lines(proc)
    assert len(lines) == 1 and lines[0].startswith(
        "error: data check (fast) failed: 8 of 8 records (100%) have errors"
    )
    assert (
        f"first: {world / 'bad_chat.json'} record 0: box coordinate 1000 outside" in lines[0]
    )  # file and record
    assert "trainable" not in proc.stdout  # the model's parameter table: never built
    report = json.loads((run / "data_check.json").read_text())
    assert report["problems"]["bad_box"]["count"] == 8 and not (run / "final").exists()


@pytest.mark.slow
def test_every_rank_stops_with_the_same_line(world, tmp_path):
    """Rank 0 checks, rank 1 waits for its verdict: both exit with the error line, neither hangs."""
    args = [str(TINY / "pretrain.yaml"), *world_overrides(world, tmp_path / "run", "bad_chat.json")]
    proc = subprocess.run(
        torchrun_cmd(2, *args), cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "error: data check (fast) failed" in line]
    assert len(lines) == 2, proc.stderr[-4000:]
