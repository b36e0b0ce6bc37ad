"""``vlrecipe check`` (``python -m data.check``): check a recipe's data (or one data file) before training.

    vlrecipe check RECIPE.yaml [section.key=value ...] [--full] [--out DIR] [--plot]
    vlrecipe check --data FILE [--data FILE ...] --format qwen --tokenizer DIR [data.max_len=2048 ...]

Prints the report and writes data_check.json / data_check.txt (and data_check_lengths.png with --plot)
into --out, by default the recipe's run directory (checkpoint.out_dir) or ./data_check for --data.
Exit status: 0 passed, 1 failed (errors over the threshold, or more bad images than
data.max_bad_images allows), 2 a usage mistake (one ``error:`` line).

This command reads a whole recipe, whose schema lives in train.recipe, so it lives in train; the
library it runs, data/check, does not read recipes.
"""

from __future__ import annotations

import argparse

from data.check.run import CheckOptions, check_data
from data.formats import FORMATS
from models.errors import ArgumentParser, UserError
from train.data_check import recipe_image_tokens, recipe_sample_builder, recipe_tokenizer
from train.recipe import load_recipe, recipe_from_dict


def main(argv: list[str] | None = None, prog: str = "python -m data.check") -> int:
    p = ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        examples=[
            'recipes/sft_lora.yaml model.init_from=ckpt/qwen-vl-chat "data.paths=[my_data.json]" --full',
            "--data my_data.json --format qwen --tokenizer ckpt/qwen-vl-chat",
        ],
    )
    p.add_argument(
        "args",
        nargs="*",
        metavar="RECIPE.yaml | section.key=value",
        help="a recipe and overrides, as for vlrecipe train (with --data: overrides only)",
    )
    p.add_argument(
        "--data",
        action="append",
        metavar="FILE",
        help="check this data file (repeatable) instead of a recipe's",
    )
    p.add_argument(
        "--format", default="auto", choices=FORMATS, help="with --data: the files' format (default auto)"
    )
    p.add_argument(
        "--tokenizer", metavar="DIR", help="with --data: the tokenizer directory (or a VLM export)"
    )
    p.add_argument(
        "--image-tokens",
        type=int,
        metavar="N",
        help="tokens per image (default: the recipe's model; 256, Qwen-VL's, with --data)",
    )
    p.add_argument(
        "--full", action="store_true", help="decode every image (default: only check that image files exist)"
    )
    p.add_argument("--out", metavar="DIR", help="where to write the report")
    p.add_argument(
        "--plot",
        action="store_true",
        help="also write the token-length histogram as a PNG (needs matplotlib)",
    )
    p.add_argument(
        "--max-error-fraction",
        type=float,
        metavar="F",
        help=(
            "fail when more records than this fraction have an error "
            "(default: data.check_max_error_fraction, 0.001)"
        ),
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="processes for the text part (default: one per core, at most 8)",
    )
    p.add_argument(
        "--image-threads", type=int, default=16, metavar="N", help="threads for the image part (default 16)"
    )
    p.add_argument(
        "--image-sample", type=int, metavar="N", help="check only N distinct images, drawn at random"
    )
    p.add_argument("--limit", type=int, metavar="N", help="read only the first N records")
    p.add_argument(
        "--micro-batch",
        type=int,
        metavar="N",
        help="samples per micro-batch for the padding estimate (default: the recipe's train.micro_batch)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    recipe_path = args.args[0] if args.args and "=" not in args.args[0] else None
    overrides = args.args[1:] if recipe_path else args.args
    if (recipe_path is None) == (args.data is None):
        raise UserError(
            "give a recipe (python -m data.check RECIPE.yaml) or --data FILE, not both or neither"
        )
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib: pip install 'vlrecipe[plot]'") from None
    if recipe_path is not None:
        recipe = load_recipe(recipe_path, overrides)
    else:
        if args.tokenizer is None and not any(
            o.startswith(("model.tokenizer_path=", "model.init_from=")) for o in overrides
        ):
            raise UserError("--data needs --tokenizer DIR (the tokenizer training will use)")
        raw = {
            "model": {"preset": "qwen_vl_7b", "tokenizer_path": args.tokenizer},
            "data": {"paths": args.data, "format": args.format},
            "train": {"steps": 1},
        }
        recipe = recipe_from_dict(raw, source="--data", overrides=overrides)

    d = recipe.data
    options = CheckOptions(
        mode="full" if args.full else "fast",
        max_error_fraction=d.check_max_error_fraction
        if args.max_error_fraction is None
        else args.max_error_fraction,
        workers=args.workers,
        image_threads=args.image_threads,
        image_sample=args.image_sample,
        limit=args.limit,
        micro_batch=args.micro_batch or recipe.train.micro_batch,
        micro_batch_tokens=recipe.train.micro_batch_tokens,
        progress=not args.no_progress,
    )
    tokenizer = recipe_tokenizer(recipe.model)
    image_tokens = args.image_tokens or recipe_image_tokens(recipe.model)
    report = check_data(
        d, tokenizer, image_tokens, options, recipe_sample_builder(recipe, tokenizer, image_tokens)
    )
    print(report.text())
    out = args.out or (recipe.checkpoint.out_dir if recipe_path else "data_check")
    written = report.write(out, plot=args.plot)
    print("wrote " + ", ".join(str(f) for f in written))
    return 0 if report.passed else 1
