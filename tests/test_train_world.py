"""A miniature data world for the training tests (tokenizer dir, images, caption + chat data) and
helpers to run ``python -m train`` in subprocesses. The test below pins that the world loads."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}


def make_world(root: Path, num_images: int = 8) -> Path:
    """tokenizer/, images/*.png, captions.json (pretraining pairs with captions of varying length)
    and chat.json (ChatML conversations). Idempotent."""
    from PIL import Image

    from tests.conftest import build_tiny_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    if (root / "done").exists():
        return root
    build_tiny_tokenizer().save_pretrained(root / "tokenizer")
    (root / "images").mkdir(exist_ok=True)
    captions, chats = [], []
    names = list(COLOURS)
    for i in range(num_images):
        colour = names[i % len(names)]
        path = root / "images" / f"{i}.png"
        Image.new("RGB", (96, 80), COLOURS[colour]).save(path)
        # Different lengths so per-micro-batch token counts differ.
        caption = f"a {colour} picture" + " of the park near the water" * (i % 3)
        captions.append({"image": f"images/{i}.png", "caption": caption})
        chats.append(
            {
                "conversations": [
                    {"from": "user", "value": f"<img>images/{i}.png</img>\nWhat color is the picture?"},
                    {"from": "assistant", "value": f"The picture is {colour}."},
                ]
            }
        )
    (root / "captions.json").write_text(json.dumps(captions))
    (root / "chat.json").write_text(json.dumps(chats))
    (root / "done").write_text("")
    return root


def world_overrides(world: Path, run: Path, data: str = "captions.json") -> list[str]:
    return [
        f"model.tokenizer_path={world / 'tokenizer'}",
        f"data.paths=[{world / data}]",
        f"checkpoint.out_dir={run}",
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="offline",
        DS_ACCELERATOR="cpu",
    )
    env.update(extra)
    return env


def torchrun_cmd(
    nproc: int, *args: str, nnodes: int = 1, node_rank: int = 0, port: int | None = None
) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes == 1:
        cmd += ["--standalone"] if port is None else [f"--master_port={port}"]
    else:
        cmd += [
            f"--nnodes={nnodes}",
            f"--node_rank={node_rank}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
        ]
    return cmd + ["-m", "train", *args]


def run_train(args: list[str], nproc: int = 0, timeout: int = 240, **env: str) -> subprocess.CompletedProcess:
    """``python -m train ARGS`` (nproc=0: plainly) or under torchrun; fails the test with the log."""
    cmd = torchrun_cmd(nproc, *args) if nproc else [sys.executable, "-m", "train", *args]
    proc = subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(**env), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def read_losses(run: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a resumed run re-logs steps, and the last entry wins."""
    losses = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        losses[rec["step"]] = rec["loss"]
    return losses


def test_world_builds_batches(tmp_path):
    from data.dataset import DataConfig, build_dataloader
    from models import load_tokenizer

    world = make_world(tmp_path / "world")
    tok = load_tokenizer(world / "tokenizer")
    loader = build_dataloader(
        DataConfig(paths=[str(world / "captions.json")], image_size=84, max_len=256, num_workers=0),
        tok,
        num_image_tokens=16,
        batch_size=4,
    )
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, 3, 84, 84)
    assert (batch["labels"] != -100).sum() > 0
