"""Training metrics reach metrics.jsonl and the chosen backend (TensorBoard,
or wandb offline without a key)."""

from __future__ import annotations

import json

from train.logger import MetricLogger
from train.recipe import LogSection


def test_every_logged_step_lands_in_metrics_jsonl_and_tensorboard(tmp_path):
    logger = MetricLogger(LogSection(backend="tensorboard"), tmp_path, is_main=True)
    logger.log({"loss": 2.5, "lr": 1e-4}, step=1, console=False)
    logger.log({"loss": 2.0, "lr": 9e-5}, step=2, console=False)
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 2.5, "lr": 1e-4}, {"step": 2, "loss": 2.0, "lr": 9e-5}]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.5), (2, 2.0)]


def test_wandb_runs_offline_when_no_api_key_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = MetricLogger(LogSection(backend="wandb"), tmp_path, is_main=True, config={"optim": {"lr": 1e-4}})
    logger.log({"loss": 1.5}, step=3, console=False)
    logger.close()
    offline_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))


def test_only_rank_zero_writes(tmp_path):
    logger = MetricLogger(LogSection(backend="tensorboard"), tmp_path, is_main=False)
    logger.log({"loss": 1.0}, step=1)
    logger.close()
    assert list(tmp_path.iterdir()) == []
