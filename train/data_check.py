"""The dataset check at trainer start-up (``data.check: off|fast|full`` in the recipe), and what both
it and ``python -m data.check RECIPE.yaml`` need from a recipe without building the model: the
tokenizer training will use and the number of image tokens per image.

Rank 0 checks while the other ranks wait; when the check fails every rank raises the same one-line
UserError, before any weights are loaded. The report is written into the run directory.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from data.check import CheckOptions, check_data
from models.errors import UserError
from train.assemble import family_of
from train.recipe import ModelSection, Recipe

# A streamed corpus is too large to read at start-up (1.4B pairs in stage 1): its first records stand
# for it. 100k records take about a minute on one core (docs/data.md has the measured rates).
STREAMING_STARTUP_RECORDS = 100_000


def recipe_tokenizer(model: ModelSection):
    """The tokenizer training will use, with the VLM special tokens added (the model family's:
    train.assemble)."""
    return family_of(model).tokenizer(model)


def recipe_image_tokens(model: ModelSection) -> int | None:
    """Image tokens per image (the model family's: train.assemble); None when each image takes its own."""
    return family_of(model).image_tokens(model)


def recipe_sample_builder(recipe: Recipe, tokenizer, image_tokens: int | None):
    """The trainer's sample builder where images take their own token counts (a Hugging Face family's: the
    check reads each image's size from its header), else None (data.check builds the Qwen-VL one)."""
    if image_tokens is not None:
        return None
    return family_of(recipe.model).sample_builder(recipe.data, tokenizer, None)


def check_data_at_startup(recipe: Recipe, is_main: bool, run_dir: Path) -> None:
    """Run ``data.check`` (fast or full) on rank 0 before the model is built; raise UserError on every
    rank if the data fails it. Writes RUN_DIR/data_check.{json,txt}."""
    if recipe.data.check == "off":
        return
    failure, error = None, None
    if is_main:
        try:
            failure = _run_check(recipe, run_dir)
        except Exception as e:  # reach the waiting ranks too, then re-raise here with the traceback
            failure, error = f"data check: {e}", e
    failure = _from_main(failure)  # the other ranks wait here (within the process group's timeout)
    if error is not None:
        raise error
    if failure is not None:
        raise UserError(failure)


def _from_main(value: str | None) -> str | None:
    """Rank 0's value on every rank (itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _run_check(recipe: Recipe, run_dir: Path) -> str | None:
    data = recipe.data
    options = CheckOptions(
        mode=data.check,
        max_error_fraction=data.check_max_error_fraction,
        micro_batch=recipe.train.micro_batch,
        micro_batch_tokens=recipe.train.micro_batch_tokens,
        progress=recipe.log.progress_bar,
        limit=STREAMING_STARTUP_RECORDS if data.streaming else None,
    )
    tokenizer, image_tokens = recipe_tokenizer(recipe.model), recipe_image_tokens(recipe.model)
    builder = recipe_sample_builder(recipe, tokenizer, image_tokens)
    report = check_data(data, tokenizer, image_tokens, options, builder)
    report.write(run_dir)
    limited = f" (first {options.limit:,} records)" if options.limit else ""
    where = f"report: {run_dir / 'data_check.txt'}"
    if report.passed:
        print(f"{report.summary()}{limited}; {where}", flush=True)
        return None
    first = report.first_error()  # the file and record of one error, so the line alone says where to look
    return (
        f"{report.summary()}{limited}; {f'first: {first}; ' if first else ''}{where} "
        "(data.check: off skips the check)"
    )
