"""Metric registry: every metric takes predictions and references keyed by sample id and returns a
flat dict of numbers (percentages unless the name says otherwise) including `num_samples`."""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from eval_mm.metrics.caption import caption_scores
from eval_mm.metrics.choice import circular_accuracy, mme_scores
from eval_mm.metrics.grounding import grounding_hit, parse_first_box
from eval_mm.metrics.text_match import (
    anls_question_score,
    exact_match_score,
    gqa_clean_answer,
    relaxed_accuracy_score,
)
from eval_mm.metrics.vqa import vqa_question_accuracy
from models.errors import UserError


@dataclass(frozen=True)
class MetricOptions:
    chartqa_reference_order: bool = False  # reproduce the reference's swapped relaxed_correctness arguments
    box_divisor: float = 1000.0  # 999 reproduces the reference's RefCOCO evaluator
    anls_threshold: float = 0.5
    with_meteor: bool = False  # METEOR needs Java and takes a while to start


class CoverageError(UserError):
    """Predictions and annotations of a benchmark do not cover the same ids."""


def check_coverage(predictions: dict[str, Any], references: dict[str, Any], where: str = "") -> None:
    """Predictions must cover exactly the annotation ids (as VQA.loadRes and the ANLS script assert)."""
    missing = [k for k in references if k not in predictions]
    extra = [k for k in predictions if k not in references]
    problems = []
    if missing:
        problems.append(f"{len(missing)} annotation ids have no prediction (e.g. {missing[:5]})")
    if extra:
        problems.append(f"{len(extra)} predictions have ids not in the annotations (e.g. {extra[:5]})")
    if problems:
        raise CoverageError(f"{where}: " + "; ".join(problems))


# A pair counts as won by a DPO policy only when its margin log p(chosen) - log p(rejected) grew over the
# reference's by more than this many nats. Where the two models agree (DPO's first step, a model scored
# against itself) the change is rounding noise, ~1e-6 nats in float32, whose sign is arbitrary: counted as
# "> 0" (TRL's rewards/accuracies) it reads anywhere from 0 to 100% (issue 27). 1e-3 nats is a 0.1% change
# of the odds ratio: far above float32 noise, far below what preference training moves.
REWARD_MARGIN_TOLERANCE = 1e-3


def _mean_percent(scores: list[float]) -> float:
    return 100.0 * sum(scores) / len(scores)


# The score in [0, 1] of one sample, for every metric that is a mean over samples: the metrics below
# average these, and `paired_change` compares two models sample by sample (python -m eval_mm compare).
# Caption scores (CIDEr and the rest), MME's paired-image scores and circular accuracy are
# not per-sample means.
SAMPLE_SCORES: dict[str, Callable[[str, Any, MetricOptions], float]] = {
    "vqa_accuracy": lambda p, r, o: vqa_question_accuracy(p, r),
    "anls": lambda p, r, o: anls_question_score(p, r, o.anls_threshold),
    "relaxed_accuracy": lambda p, r, o: relaxed_accuracy_score(p, r, o.chartqa_reference_order),
    "exact_match": lambda p, r, o: exact_match_score(p, r),
    "gqa_accuracy": lambda p, r, o: exact_match_score(gqa_clean_answer(p), r),
    "grounding": lambda p, r, o: float(
        grounding_hit(p, r["bbox"], r["width"], r["height"], o.box_divisor)[0]
    ),
    "choice_accuracy": lambda p, r, o: float(p.strip() == r),
    "preference": lambda p, r, o: float(float(p) > 0),  # margin log p(chosen) - log p(rejected) > 0
}


def sample_scores(
    metric: str,
    predictions: dict[str, Any],
    references: dict[str, Any],
    options: MetricOptions = MetricOptions(),
) -> dict[str, float]:
    """id -> the sample's score in [0, 1] under ``metric`` (a key of SAMPLE_SCORES), for every reference."""
    score = SAMPLE_SCORES[metric]
    return {k: score(predictions[k], references[k], options) for k in references}


def _mean_score(metric: str, predictions, references, options) -> float:
    return _mean_percent(list(sample_scores(metric, predictions, references, options).values()))


def _per_question(metric: str, name: str, digits: int | None = None):
    def mean(predictions: dict[str, str], references: dict[str, Any], options: MetricOptions) -> dict:
        value = _mean_score(metric, predictions, references, options)
        return {name: value if digits is None else round(value, digits)}

    return mean


def _grounding(predictions, references, options):
    return {
        "accuracy_iou0.5": _mean_score("grounding", predictions, references, options),
        "num_unparsable": sum(parse_first_box(predictions[k]) is None for k in references),
    }


def _choice(predictions, references, options):
    return {
        "accuracy": _mean_score("choice_accuracy", predictions, references, options),
        "num_unparsable": sum(1 for k in references if not predictions[k].strip()),
    }


def _circular(predictions, references, options):
    correct = {}
    for k in references:
        try:
            correct[int(k)] = predictions[k].strip() == references[k]
        except ValueError as e:
            raise UserError(f"MMBench ids must be integer indices, got {k!r}") from e
    accuracy, num_questions = circular_accuracy(correct)
    return {
        "circular_accuracy": 100.0 * accuracy,
        "accuracy": _mean_percent([float(v) for v in correct.values()]),
        "num_questions": num_questions,
    }


def _preference(predictions, references, options):
    margins = [float(predictions[k]) for k in references]
    return {
        "accuracy": _mean_score("preference", predictions, references, options),
        "mean_margin": sum(margins) / len(margins),
    }


def paired_change(baseline: dict[str, float], candidate: dict[str, float], where: str = "") -> dict:
    """Two models' per-sample scores (``sample_scores``) on the same samples: their means, the change
    (candidate - baseline) and its paired standard error, in points, and how many samples each wins.

    The standard error is that of the mean per-sample difference, sd(d) / sqrt(n): pairing removes the
    spread of sample difficulty that two independent standard errors would count twice, so a change of a
    few points on a few hundred samples can be told from noise (about two standard errors)."""
    if set(baseline) != set(candidate):
        differ = sorted(set(baseline) ^ set(candidate))
        raise CoverageError(
            f"{where}: the two runs scored different samples ({len(differ)} differ, "
            f"e.g. {differ[0]!r}); compare runs of the same benchmark and --limit"
        )
    n = len(baseline)
    if n == 0:
        raise UserError(f"{where}: no samples to compare")
    diffs = [candidate[k] - baseline[k] for k in baseline]
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    return {
        "baseline": _mean_percent(list(baseline.values())),
        "candidate": _mean_percent(list(candidate.values())),
        "change": 100.0 * mean,
        "paired_se": 100.0 * math.sqrt(variance / n),
        "won": sum(d > 0 for d in diffs),
        "lost": sum(d < 0 for d in diffs),
        "num_samples": n,
    }


def reward_accuracy(
    margins: dict[str, float | str], reference_margins: dict[str, float | str], where: str = ""
) -> dict:
    """DPO's implicit reward on held-out pairs: a pair is right when the policy widened its margin
    log p(chosen) - log p(rejected) over the reference model's by more than ``REWARD_MARGIN_TOLERANCE``
    nats (the reward margin beta * (policy margin - reference margin) > beta * tolerance), the evaluation
    form of TRL's ``rewards/accuracies``. Both dicts map pair ids to
    margins (each model's ``predictions.jsonl`` of a preference benchmark) and must cover the same pairs."""
    missing = sorted(set(margins) ^ set(reference_margins))
    if missing:
        raise CoverageError(
            f"{where}: the policy's and the reference's predictions cover different pairs "
            f"({len(missing)} differ, e.g. {missing[0]!r})"
        )
    try:  # predictions files hold them as written (numbers, or their text when read back by `score`)
        changes = [float(margins[k]) - float(reference_margins[k]) for k in margins]
    except ValueError as e:
        raise UserError(f"{where}: a preference prediction must be a number (a margin in nats): {e}") from e
    return {
        "reward_accuracy": _mean_percent([float(c > REWARD_MARGIN_TOLERANCE) for c in changes]),
        "mean_margin_change": sum(changes) / len(changes),
        "num_pairs": len(changes),
    }


def _caption(predictions, references, options):
    return caption_scores(predictions, references, with_meteor=options.with_meteor)


def _mme(predictions, references, options):
    return mme_scores([(task, image, gt, predictions[k]) for k, (task, image, gt) in references.items()])


METRICS: dict[str, Callable[[dict[str, str], dict[str, Any], MetricOptions], dict]] = {
    "vqa_accuracy": _per_question(
        "vqa_accuracy", "vqa_accuracy", digits=2
    ),  # the official script's round(100 * mean, 2)
    "anls": _per_question("anls", "anls"),
    "relaxed_accuracy": _per_question("relaxed_accuracy", "relaxed_accuracy"),
    "exact_match": _per_question("exact_match", "accuracy"),
    "gqa_accuracy": _per_question("gqa_accuracy", "accuracy"),
    "grounding": _grounding,
    "choice_accuracy": _choice,
    "circular_accuracy": _circular,
    "caption": _caption,
    "mme": _mme,
    "preference": _preference,
}


def compute_metric(
    metric: str,
    predictions: dict[str, str],
    references: dict[str, Any],
    options: MetricOptions = MetricOptions(),
    where: str = "",
) -> dict[str, Any]:
    """Score predictions (id -> model answer text) against references (id -> ground truth)."""
    if not references:
        raise UserError(f"{where}: no annotations to score")
    check_coverage(predictions, references, where)
    result = METRICS[metric](predictions, references, options)
    return {**result, "num_samples": len(references)}
