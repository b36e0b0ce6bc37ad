"""Did a model change beyond noise? Two evaluations of the same samples, compared sample by sample.

    python -m eval_mm compare BASELINE_DIR CANDIDATE_DIR --data-root ROOT [--bench a,b]

BASELINE_DIR and CANDIDATE_DIR are what ``python -m eval_mm run --out`` writes (a trainer run's ``eval/``
is one): a folder per benchmark holding ``predictions.jsonl``. For each benchmark both hold, every
sample is scored under its metric (eval_mm.metrics.SAMPLE_SCORES) and the change is given with its paired
standard error and the samples won and lost. Two separate standard errors would overstate the noise of a
change: most samples are answered alike by both models, and pairing removes them. For a preference
benchmark the candidate's reward accuracy over the baseline, the held-out form of DPO's
``rewards/accuracies``, is added (eval_mm.metrics.reward_accuracy).
"""

from __future__ import annotations

from pathlib import Path

from eval_mm.benchmarks import BENCHMARKS, Benchmark, parse_bench_list
from eval_mm.datasets import load_references
from eval_mm.metrics import SAMPLE_SCORES, MetricOptions, paired_change, reward_accuracy, sample_scores
from eval_mm.predictions import PREDICTIONS, read_predictions
from models.errors import MissingFileError, UserError


def _predictions(run_dir: Path, bench: Benchmark) -> dict[str, str | float]:
    bench_dir = run_dir / bench.name
    if not (bench_dir / PREDICTIONS).is_file():
        raise MissingFileError(f"{bench_dir / PREDICTIONS}: no predictions of {bench.name} in {run_dir}")
    return {k: r["prediction"] for k, r in read_predictions(bench_dir).items()}


def benchmarks_in_both(baseline_dir: Path, candidate_dir: Path) -> list[Benchmark]:
    """The known benchmarks whose predictions both folders hold, in name order."""
    names = sorted(
        p.parent.name
        for p in baseline_dir.glob(f"*/{PREDICTIONS}")
        if p.parent.name in BENCHMARKS and (candidate_dir / p.parent.name / PREDICTIONS).is_file()
    )
    return [BENCHMARKS[n] for n in names]


def compare_runs(
    baseline_dir: str | Path,
    candidate_dir: str | Path,
    data_root: str | Path,
    benches: str | None = None,
    options: MetricOptions = MetricOptions(),
) -> dict[str, dict]:
    """benchmark -> ``paired_change`` of the candidate over the baseline (plus ``reward_accuracy`` for a
    preference benchmark), or ``{"skipped": reason}`` for a metric that is not a mean over samples."""
    baseline_dir, candidate_dir, data_root = Path(baseline_dir), Path(candidate_dir), Path(data_root)
    for d in (baseline_dir, candidate_dir):
        if not d.is_dir():
            raise MissingFileError(f"evaluation folder not found: {d}")
    selected = parse_bench_list(benches) if benches else benchmarks_in_both(baseline_dir, candidate_dir)
    if not selected:
        raise UserError(f"{baseline_dir} and {candidate_dir} hold no predictions of the same benchmark")
    results = {}
    for bench in selected:
        where = f"{bench.name} ({baseline_dir} vs {candidate_dir})"
        if bench.metric not in SAMPLE_SCORES:
            results[bench.name] = {
                "skipped": f"{bench.metric} is not a mean over samples: no paired comparison"
            }
            continue
        baseline, candidate = _predictions(baseline_dir, bench), _predictions(candidate_dir, bench)
        references = load_references(bench, data_root / bench.references_file)
        unknown = [k for k in baseline if k not in references]
        if unknown:
            raise UserError(
                f"{where}: {len(unknown)} predictions have no annotation in "
                f"{data_root / bench.references_file} (e.g. {unknown[0]!r}); is --data-root right?"
            )
        scores = [
            sample_scores(bench.metric, preds, {k: references[k] for k in preds}, options)
            for preds in (baseline, candidate)
        ]
        results[bench.name] = paired_change(*scores, where=where)
        if bench.kind == "preference":
            results[bench.name] |= reward_accuracy(candidate, baseline, where=where)
    return results


def format_comparison(
    results: dict[str, dict], baseline: str = "baseline", candidate: str = "candidate"
) -> str:
    """A table of ``compare_runs``' results, one benchmark per line."""
    lines = [
        f"{'benchmark':24} {'samples':>7} {baseline:>10} {candidate:>10} {'change':>7} {'paired se':>9} "
        f"{'won':>5} {'lost':>5}"
    ]
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"{name:24} skipped: {r['skipped']}")
            continue
        line = (
            f"{name:24} {r['num_samples']:>7} {r['baseline']:>10.1f} {r['candidate']:>10.1f} "
            f"{r['change']:>+7.1f} {r['paired_se']:>9.1f} {r['won']:>5} {r['lost']:>5}"
        )
        if "reward_accuracy" in r:
            line += (
                f"   reward accuracy {r['reward_accuracy']:.1f}% "
                f"(mean margin change {r['mean_margin_change']:+.2f} nats)"
            )
        lines.append(line)
    return "\n".join(lines)
