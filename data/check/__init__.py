"""The dataset check: read a recipe's data exactly as training would and report what would hurt a run.

    vlrecipe check RECIPE.yaml [section.key=value ...] [--full] [--out DIR] [--plot]
    vlrecipe check --data FILE --format qwen --tokenizer DIR [data.max_len=2048 ...]

Records go through the trainer's own code (data.formats validation, ChatML / task templates, the
tokenizer, span-safe truncation at max_len); the report counts records per format and task, images
per sample, token lengths (histogram), truncations and the image spans they would cut, samples with
no supervised token, malformed or out-of-range <img>/<ref>/<box>/<quad> tags, missing or undecodable
images, duplicates and the fraction of tokens supervised, and fails when errors exceed a threshold.

    problems.py  what is looked for (PROBLEMS) and how each kind of record is read (RECORD_KINDS)
    scan.py      the text part: records -> samples -> facts, chunk by chunk in worker processes
    images.py    the image part: distinct paths checked by a thread pool
    run.py       check_data(config, tokenizer, num_image_tokens, CheckOptions) -> CheckReport
    report.py    the report: JSON, text, length histogram (PNG with matplotlib), pass or fail
    __main__.py  python -m data.check: the command line, train/data_check_cli.py (it reads recipes)

The trainer runs it at start-up with ``data.check: fast`` (the default; train/data_check.py).
"""

from data.check.report import CheckReport
from data.check.run import CheckOptions, check_data

__all__ = ["CheckOptions", "CheckReport", "check_data"]
