"""Saved predictions: what ``eval run`` writes (``predictions.jsonl`` per benchmark, and
``predictions.part*.jsonl`` while it runs), read back to resume, score and compare without a model."""

from __future__ import annotations

import json
from pathlib import Path

from models.errors import MissingFileError, UserError

PREDICTIONS = "predictions.jsonl"  # a benchmark's merged predictions, one JSON record per line
PARTS = "predictions.part*.jsonl"  # what each rank of an unfinished run wrote (predictions.part<R>.jsonl)


def part_file(bench_dir: Path, rank: int) -> Path:
    return bench_dir / f"predictions.part{rank}.jsonl"


def read_predictions(bench_dir: Path) -> dict[str, dict]:
    """Records already predicted: the merged file plus the parts of an interrupted run. A truncated
    last line (a run killed mid-write) is ignored, and its sample predicted again."""
    records: dict[str, dict] = {}
    files = [bench_dir / PREDICTIONS, *sorted(bench_dir.glob(PARTS))]
    for file in files:
        if not file.exists():
            continue
        lines = file.read_text(encoding="utf-8").splitlines()
        for index, line in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if index == len(lines) - 1:
                    continue
                raise UserError(f"{file} line {index + 1}: invalid JSON: {e}") from e
            records[str(record["id"])] = record
    return records


def read_prediction_file(path: Path) -> dict[str, str]:
    """id -> prediction of a ``predictions.jsonl`` (what ``run`` writes); one error line per bad record."""
    if not path.is_file():
        raise MissingFileError(f"predictions file not found: {path}")
    predictions = {}
    for index, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            predictions[str(record["id"])] = str(
                record["prediction"] if record["prediction"] is not None else ""
            )
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(
                f"{path} line {index + 1}: need a JSON object with 'id' and 'prediction' ({e})"
            ) from e
    return predictions
