"""Benchmark evaluation: `python -m eval_mm run|score|list`, or `eval_mm.evaluate(...)` in-process."""

from eval_mm.runner import evaluate

__all__ = ["evaluate"]
