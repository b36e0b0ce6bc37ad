"""``python -m train RECIPE.yaml [section.key=value ...]``: plainly, under torchrun, or under the
deepspeed launcher (which adds ``--local_rank=N``; the rank is read from the environment instead)."""

from __future__ import annotations

import argparse
import os
import sys

# Packed rows change length every step: expandable segments let the CUDA caching allocator grow blocks
# instead of fragmenting and retrying (a stall of a tenth of a second or more). Set before CUDA starts.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from models.errors import run_cli
from train.loop import train
from train.recipe import RecipeError, load_recipe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=1e-4")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        sys.exit(f"error: {e}")
    train(recipe)


if __name__ == "__main__":
    run_cli(main)
