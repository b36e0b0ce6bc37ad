"""Benchmark evaluation: `python -m eval_mm run|score|list`, or `eval_mm.evaluate(...)` in-process."""


def __getattr__(name: str):
    # Lazy, so `python -m eval_mm score` and the metrics never import torch or the model code.
    if name == "evaluate":
        from eval_mm.runner import evaluate

        return evaluate
    raise AttributeError(name)


__all__ = ["evaluate"]
