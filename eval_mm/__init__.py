"""Benchmark evaluation: `vlrecipe eval run|score|compare|list` (eval_mm.cli), or
`eval_mm.runner.evaluate(...)` in-process."""
