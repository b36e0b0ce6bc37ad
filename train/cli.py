"""``vlrecipe VERB ...``: every tool of the project behind one command (the console script of pyproject.toml).

Each verb runs the ``main(argv, prog)`` of the module that implements it, the same function its
``python -m MODULE`` runs, so the two are interchangeable: ``vlrecipe train R.yaml`` is ``python -m train
R.yaml``. The module is imported only when its verb runs: ``vlrecipe --help`` loads no torch. This is the
top of the import order (docs/design.md): it may import anything, and nothing imports it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from models.errors import ArgumentParser, run_cli


@dataclass(frozen=True)
class Verb:
    module: str  # whose main(argv, prog) runs the verb
    summary: str  # its line in `vlrecipe --help`
    first_args: tuple[str, ...] = ()  # put before the user's arguments (chat is a subcommand of eval_mm)


# In the order of typical use; then the measurements. `python -m MODULE` runs the same main.
VERBS = {
    "synth": Verb("data.synthetic", "write the synthetic world: images, training data and benchmarks"),
    "check": Verb("train.data_check_cli", "check a recipe's data (or a data file) as training will read it"),
    "plan": Verb("train.plan", "memory per GPU and step time of a recipe, before anything is loaded"),
    "train": Verb("train.run", "train by a recipe: one process, torchrun or the deepspeed launcher"),
    "chat": Verb("eval_mm.cli", "talk to a checkpoint about images in the terminal", ("chat",)),
    "web": Verb("eval_mm.web", "the same chat as a web page on 127.0.0.1 (the [web] extra)"),
    "eval": Verb("eval_mm.cli", "benchmarks: eval run | score | list | compare"),
    "onpolicy": Verb("eval_mm.onpolicy", "DPO pairs whose rejected answer is the model's own mistake"),
    "convert": Verb("models.convert_qwenvl", "convert a released Qwen-VL(-Chat) checkpoint (no remote code)"),
    "export": Verb("models.export_qwenvl", "export a trained model in the released Qwen-VL layout"),
    "demo": Verb("train.demo", "the embedded demo on CPU: synthetic world, four stages, evaluations"),
    "bench": Verb("train.bench", "training throughput of a recipe, read from the trainer's own logs"),
    "calibrate": Verb("train.plan_calibration", "the planner against every GPU memory measurement"),
    "bench-eval": Verb("eval_mm.bench_throughput", "evaluation throughput of the full-scale shape (GPU)"),
    "bench-check": Verb("data.bench_check", "speed of the dataset check on a large synthetic file"),
    "bench-loader": Verb("data.bench_loader", "DataLoader throughput per worker count"),
    "bench-resume": Verb("data.bench_resume", "time of a streamed resume early and late in an epoch"),
    "smoke": Verb("models.smoke_full_scale", "forward + backward of the full Qwen-VL shape on one GPU"),
}


def build_parser() -> ArgumentParser:
    width = max(map(len, VERBS))
    verbs = "\n".join(f"  {name:{width}}  {verb.summary}" for name, verb in VERBS.items())
    parser = ArgumentParser(
        prog="vlrecipe",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train vision-language models by the Qwen-VL recipe.",
        epilog=f"verbs:\n{verbs}\n\n`vlrecipe VERB --help` shows a verb's options and an example. "
        "`--debug` anywhere shows the traceback of a user error.",
        examples=["demo", "train recipes/sft_lora.yaml model.init_from=ckpt/qwen-vl-chat"],
    )
    parser.add_argument("verb", metavar="VERB", choices=VERBS, help="one of the verbs below")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # the verb parses them
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    verb = VERBS[args.verb]
    # argparse names a subcommand's parser after its parent's prog: `vlrecipe` + `chat` reads `vlrecipe chat`.
    prog = "vlrecipe" if verb.first_args else f"vlrecipe {args.verb}"
    status = importlib.import_module(verb.module).main([*verb.first_args, *args.args], prog=prog)
    # A verb's main returns its exit status, or None, or (the benchmarks) its figures: success.
    return status if isinstance(status, int) else 0


def cli() -> None:
    """The console script: a user's mistake is one ``error:`` line and status 2 (models.errors.run_cli)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
