"""``vlrecipe train RECIPE.yaml [section.key=value ...] [--debug]`` (``python -m train``): plainly, under
torchrun, or under the deepspeed launcher (which adds ``--local_rank=N``; the rank is read from the
environment instead). A mistake in the recipe, the data or a path prints one line ``error: ...`` and
exits with status 2 (``--debug`` or ``VLRECIPE_DEBUG=1`` shows the traceback)."""

from __future__ import annotations

import argparse
import os

# Packed rows change length every step: expandable segments let the CUDA caching allocator grow blocks
# instead of fragmenting and retrying (a stall of a tenth of a second or more). Set before CUDA starts.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from models.errors import ArgumentParser
from train.loop import train
from train.parallel import shutdown_distributed
from train.recipe import load_recipe


def main(argv: list[str] | None = None, prog: str = "python -m train") -> None:
    parser = ArgumentParser(
        prog=prog,
        description=__doc__,
        examples=[
            "recipes/sft_lora.yaml model.init_from=ckpt/qwen-vl-chat "
            '"data.paths=[my_data.json]" checkpoint.out_dir=runs/my_lora'
        ],
    )
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument(
        "overrides", nargs="*", default=[], help="section.key=value overrides, e.g. optim.lr=1e-4"
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    args = parser.parse_args(argv)
    train(load_recipe(args.recipe, args.overrides))
    shutdown_distributed()
