"""Trainer options that must not change the losses: gradient checkpointing, and resuming with
DataLoader workers (the sampler position, not the workers' prefetch, is what a checkpoint holds)."""

from __future__ import annotations

import pytest

from tests.test_train_world import TINY, make_world, read_losses, run_train, world_overrides

pytestmark = pytest.mark.slow


def test_gradient_checkpointing_leaves_the_losses_unchanged(tmp_path):
    world = make_world(tmp_path / "world")
    args = [
        str(TINY / "multitask.yaml"),
        "model.preset=tiny",
        "train.steps=4",
        "log.every=1",
        "train.micro_batch=2",
    ]
    run_train([*args, *world_overrides(world, tmp_path / "plain")])
    run_train([*args, *world_overrides(world, tmp_path / "ckpt"), "train.grad_checkpointing=true"])
    plain, ckpt = read_losses(tmp_path / "plain"), read_losses(tmp_path / "ckpt")
    assert sorted(plain) == [1, 2, 3, 4]
    assert ckpt == pytest.approx(plain, rel=1e-6)


def test_resume_with_dataloader_workers_matches_an_uninterrupted_run(tmp_path):
    world = make_world(tmp_path / "world")
    args = [
        str(TINY / "pretrain.yaml"),
        "train.steps=6",
        "log.every=1",
        "checkpoint.every=3",
        "train.micro_batch=3",
        "data.num_workers=2",
    ]
    run_train([*args, *world_overrides(world, tmp_path / "straight")])
    stopped = tmp_path / "stopped"
    run_train([*args, *world_overrides(world, stopped), "train.stop_after_steps=3"])
    run_train([*args, *world_overrides(world, stopped), "train.resume=auto"])
    assert read_losses(stopped) == read_losses(tmp_path / "straight")
