"""vlrecipe eval run|score|compare|list and vlrecipe chat (python -m eval_mm; see docs/evaluation.md).
A mistake in the command line, a benchmark file or a path prints one line ``error: ...`` and exits with
status 2 (``--debug`` shows the traceback)."""

import argparse
import importlib
import json
from pathlib import Path

from eval_mm.benchmarks import BENCHMARKS, get_benchmark
from eval_mm.compare import compare_runs, format_comparison
from eval_mm.datasets import load_references
from eval_mm.metrics import compute_metric, reward_accuracy
from eval_mm.options import (
    PROMPT_FORMATS,
    add_checkpoint_arguments,
    add_metric_options,
    add_model_arguments,
    metric_options,
)
from eval_mm.predictions import read_prediction_file
from models.errors import ArgumentParser, UserError, non_negative_int, positive_int

DEMO_EXPORT = "runs/demo/sft/final"  # what `vlrecipe demo` trains: the examples run on it


def build_parser(prog: str = "python -m eval_mm") -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog,
        description=__doc__,
        examples=[
            "list",
            f"run --checkpoint {DEMO_EXPORT} --bench synth_vqa "
            "--data-root runs/demo/data --out runs/eval_sft",
        ],
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of a user error (anywhere on the line)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="evaluate a checkpoint (single device or under torchrun)",
        examples=[
            f"--checkpoint {DEMO_EXPORT} --bench synth_vqa,synth_grounding "
            "--data-root runs/demo/data --out runs/eval_sft --limit 200"
        ],
    )
    add_checkpoint_arguments(run)
    run.add_argument("--bench", required=True, help="comma-separated benchmark names (see `list`)")
    run.add_argument("--data-root", required=True)
    run.add_argument("--out", required=True)
    run.add_argument(
        "--limit", type=positive_int, default=None, help="only the first N samples of each benchmark"
    )
    run.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        help="prompts per batch (multiple choice: all options of a prompt count as one)",
    )
    run.add_argument(
        "--num-workers",
        type=non_negative_int,
        default=None,
        help="DataLoader workers (tokenising, image decoding); default 4 with CUDA, 0 on CPU",
    )
    run.add_argument(
        "--prompt-format",
        choices=PROMPT_FORMATS,
        default="auto",
        help="auto: chatml if the checkpoint records a chat format / SFT stage, else raw",
    )
    run.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="auto: bfloat16 on GPU, float32 on CPU",
    )
    run.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="on: a static KV cache whose decode step transformers compiles (CUDA graphs), and "
        "compiled vision blocks; auto: on with CUDA (docs/evaluation.md)",
    )
    add_metric_options(run)

    score_example = (
        "--bench synth_vqa --predictions runs/eval_sft/synth_vqa/predictions.jsonl "
        "--annotations runs/demo/data/synthetic/vqa_test_annotations.json"
    )
    score = sub.add_parser("score", help="score saved predictions without a model", examples=[score_example])
    score.add_argument("--bench", required=True)
    score.add_argument("--predictions", required=True, help="JSONL with 'id' and 'prediction' per line")
    score.add_argument("--annotations", required=True, help="the benchmark's annotation file (see `list`)")
    score.add_argument(
        "--reference-predictions",
        default=None,
        metavar="JSONL",
        help="a preference benchmark's predictions by the reference model (e.g. the SFT export "
        "a DPO run started from): adds the held-out reward accuracy (eval_mm.metrics)",
    )
    add_metric_options(score)

    compare = sub.add_parser(
        "compare",
        help="the change between two evaluations of the same samples, with its "
        "paired standard error (eval_mm.compare)",
        examples=["runs/demo/sft/eval runs/demo/dpo/eval --data-root runs/demo/data"],
    )
    compare.add_argument("baseline", help="an evaluation folder (run --out, or a training run's eval/)")
    compare.add_argument("candidate", help="another evaluation folder of the same benchmarks and samples")
    compare.add_argument("--data-root", required=True, help="where the benchmarks' annotation files are")
    compare.add_argument(
        "--bench", default=None, help="comma-separated benchmarks (default: every one both hold)"
    )
    compare.add_argument("--json", action="store_true", help="print the results as one JSON object")
    add_metric_options(compare)

    sub.add_parser("list", help="benchmarks, their data files and metrics", examples=[""])

    chat_example = (
        f"--checkpoint {DEMO_EXPORT} --image runs/demo/data/synthetic/images/eval/000002.png "
        '--prompt "Describe the image."'
    )
    chat = sub.add_parser(
        "chat",
        help="talk to a checkpoint about images (one question, or a session on stdin)",
        examples=[chat_example],
    )
    add_model_arguments(chat)
    chat.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="an image for the first question (repeatable)",
    )
    chat.add_argument(
        "--prompt", default=None, help="answer this once and exit (without it: an interactive session)"
    )
    chat.add_argument(
        "--draw",
        default=None,
        metavar="OUT.png",
        help="write the last image with the answer's <ref>/<box> drawn as labelled rectangles",
    )
    chat.add_argument(
        "--json", action="store_true", help='with --prompt: print {"answer", "boxes"} as the last line'
    )
    return parser


def cmd_list() -> None:
    print(f"{'benchmark':24} {'kind':9} {'metric':18} {'tokens':7} files (relative to --data-root)")
    for b in BENCHMARKS.values():
        files = b.test_file + (f" + {b.annotation_file}" if b.annotation_file else "")
        print(f"{b.name:24} {b.kind:9} {b.metric:18} {b.max_new_tokens:<7} {files}")


def cmd_score(args) -> dict:
    bench = get_benchmark(args.bench)
    references = load_references(bench, args.annotations)
    path = Path(args.predictions)
    predictions = read_prediction_file(path)
    metrics = compute_metric(
        bench.metric,
        predictions,
        references,
        metric_options(args),
        where=f"{bench.name} ({path} vs {args.annotations})",
    )
    if args.reference_predictions is not None:
        if bench.kind != "preference":
            raise UserError(f"--reference-predictions: {bench.name} is not a preference benchmark")
        reference_path = Path(args.reference_predictions)
        metrics |= reward_accuracy(
            predictions,
            read_prediction_file(reference_path),
            where=f"{bench.name} ({path} vs {reference_path})",
        )
    print(json.dumps(metrics))
    return metrics


def cmd_compare(args) -> dict:
    results = compare_runs(args.baseline, args.candidate, args.data_root, args.bench, metric_options(args))
    print(json.dumps(results) if args.json else format_comparison(results))
    return results


def main(argv: list[str] | None = None, prog: str = "python -m eval_mm") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.command == "list":
        cmd_list()
    elif args.command == "score":
        cmd_score(args)
    elif args.command == "compare":
        cmd_compare(args)
    else:  # run, chat: they load a model; the module that does is imported only now (torch, transformers)
        commands = importlib.import_module("eval_mm.model_commands")
        if args.command == "chat":
            commands.cmd_chat(args)
        else:
            commands.cmd_run(args)
    return 0
