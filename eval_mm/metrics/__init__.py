"""Metric registry: every metric takes predictions and references keyed by sample id and returns a
flat dict of numbers (percentages unless the name says otherwise) including `num_samples`."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from eval_mm.metrics.caption import caption_scores
from eval_mm.metrics.choice import circular_accuracy, mme_scores
from eval_mm.metrics.grounding import grounding_hit
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


def _mean_percent(scores: list[float]) -> float:
    return 100.0 * sum(scores) / len(scores)


def _per_question(fn: Callable[[str, Any], float], name: str):
    def metric(predictions: dict[str, str], references: dict[str, Any], options: MetricOptions) -> dict:
        return {name: _mean_percent([fn(predictions[k], references[k], options) for k in references])}
    return metric


def _vqa(predictions, references, options):
    # The official script reports round(100 * mean, 2).
    return {"vqa_accuracy": round(_mean_percent([vqa_question_accuracy(predictions[k], references[k])
                                                 for k in references]), 2)}


def _grounding(predictions, references, options):
    hits, unparsable = [], 0
    for k, ref in references.items():
        hit, parsed = grounding_hit(predictions[k], ref["bbox"], ref["width"], ref["height"], options.box_divisor)
        hits.append(float(hit))
        unparsable += not parsed
    return {"accuracy_iou0.5": _mean_percent(hits), "num_unparsable": unparsable}


def _choice(predictions, references, options):
    correct = [float(predictions[k].strip() == references[k]) for k in references]
    unparsable = sum(1 for k in references if not predictions[k].strip())
    return {"accuracy": _mean_percent(correct), "num_unparsable": unparsable}


def _circular(predictions, references, options):
    correct = {}
    for k in references:
        try:
            correct[int(k)] = predictions[k].strip() == references[k]
        except ValueError as e:
            raise UserError(f"MMBench ids must be integer indices, got {k!r}") from e
    accuracy, num_questions = circular_accuracy(correct)
    return {"circular_accuracy": 100.0 * accuracy, "accuracy": _mean_percent([float(v) for v in correct.values()]),
            "num_questions": num_questions}


def _preference(predictions, references, options):
    margins = [float(predictions[k]) for k in references]  # log p(chosen) - log p(rejected)
    return {"accuracy": _mean_percent([float(m > 0) for m in margins]), "mean_margin": sum(margins) / len(margins)}


def reward_accuracy(margins: dict[str, float | str], reference_margins: dict[str, float | str],
                    where: str = "") -> dict:
    """DPO's implicit reward on held-out pairs: a pair is right when the policy widened its margin
    log p(chosen) - log p(rejected) over the reference model's (the reward margin beta * (policy margin -
    reference margin) > 0), the evaluation form of TRL's ``rewards/accuracies``. Both dicts map pair ids to
    margins (each model's ``predictions.jsonl`` of a preference benchmark) and must cover the same pairs."""
    missing = sorted(set(margins) ^ set(reference_margins))
    if missing:
        raise CoverageError(f"{where}: the policy's and the reference's predictions cover different pairs "
                            f"({len(missing)} differ, e.g. {missing[0]!r})")
    try:  # predictions files hold them as written (numbers, or their text when read back by `score`)
        changes = [float(margins[k]) - float(reference_margins[k]) for k in margins]
    except ValueError as e:
        raise UserError(f"{where}: a preference prediction must be a number (a margin in nats): {e}") from e
    return {"reward_accuracy": _mean_percent([float(c > 0) for c in changes]),
            "mean_margin_change": sum(changes) / len(changes), "num_pairs": len(changes)}


def _caption(predictions, references, options):
    return caption_scores(predictions, references, with_meteor=options.with_meteor)


def _mme(predictions, references, options):
    return mme_scores([(task, image, gt, predictions[k]) for k, (task, image, gt) in references.items()])


METRICS: dict[str, Callable[[dict[str, str], dict[str, Any], MetricOptions], dict]] = {
    "vqa_accuracy": _vqa,
    "anls": _per_question(lambda p, r, o: anls_question_score(p, r, o.anls_threshold), "anls"),
    "relaxed_accuracy": _per_question(
        lambda p, r, o: relaxed_accuracy_score(p, r, o.chartqa_reference_order), "relaxed_accuracy"),
    "exact_match": _per_question(lambda p, r, o: exact_match_score(p, r), "accuracy"),
    "gqa_accuracy": _per_question(lambda p, r, o: exact_match_score(gqa_clean_answer(p), r), "accuracy"),
    "grounding": _grounding,
    "choice_accuracy": _choice,
    "circular_accuracy": _circular,
    "caption": _caption,
    "mme": _mme,
    "preference": _preference,
}


def compute_metric(metric: str, predictions: dict[str, str], references: dict[str, Any],
                   options: MetricOptions = MetricOptions(), where: str = "") -> dict[str, Any]:
    """Score predictions (id -> model answer text) against references (id -> ground truth)."""
    if not references:
        raise UserError(f"{where}: no annotations to score")
    check_coverage(predictions, references, where)
    result = METRICS[metric](predictions, references, options)
    return {**result, "num_samples": len(references)}
