"""Multiple-choice scoring: plain accuracy, MMBench CircularEval, MME acc / acc+."""

from collections import defaultdict

MMBENCH_CIRCULAR_STRIDE = 1_000_000  # variant k of question i has index k * 1e6 + i

MME_PERCEPTION = [
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
]
MME_COGNITION = ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]


def circular_accuracy(correct_by_index: dict[int, bool]) -> tuple[float, int]:
    """CircularEval: a question (index mod 1e6) is right only if every variant present is right.
    Returns (accuracy in [0, 1], number of questions)."""
    all_right: dict[int, bool] = {}
    for index, correct in correct_by_index.items():
        base = index % MMBENCH_CIRCULAR_STRIDE
        all_right[base] = all_right.get(base, True) and correct
    if not all_right:
        raise ValueError("no MMBench predictions to score")
    return sum(all_right.values()) / len(all_right), len(all_right)


def mme_parse_yes_no(response: str) -> str:
    """MME calculation.py: exact 'yes'/'no', else look for them in the first 4 characters, else 'other'."""
    response = response.strip().lower()
    if response in ("yes", "no"):
        return response
    prefix = response[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_scores(records: list[tuple[str, str, str, str]]) -> dict[str, float]:
    """records: (task, image, gt 'yes'/'no', model response). Per task: acc = % questions right,
    acc+ = % images with all (two) questions right, score = acc + acc+; perception and cognition are
    sums of task scores, as MME's calculation.py (images grouped by name instead of consecutive pairs,
    which is the same thing on the official files)."""
    per_task_correct: dict[str, list[bool]] = defaultdict(list)
    per_image_correct: dict[tuple[str, str], bool] = {}
    unparsable = 0
    for task, image, gt, response in records:
        gt = gt.strip().lower()
        if gt not in ("yes", "no"):
            raise ValueError(f"MME ground truth must be yes/no, got {gt!r} (task {task}, image {image})")
        pred = mme_parse_yes_no(response)
        unparsable += pred == "other"
        correct = pred == gt
        per_task_correct[task].append(correct)
        per_image_correct[(task, image)] = per_image_correct.get((task, image), True) and correct
    metrics: dict[str, float] = {}
    category_totals = {"perception": 0.0, "cognition": 0.0}
    for task, corrects in sorted(per_task_correct.items()):
        images = [ok for (t, _), ok in per_image_correct.items() if t == task]
        acc = 100.0 * sum(corrects) / len(corrects)
        acc_plus = 100.0 * sum(images) / len(images)
        metrics[f"{task}/acc"] = acc
        metrics[f"{task}/acc_plus"] = acc_plus
        metrics[f"{task}/score"] = acc + acc_plus
        if task in MME_PERCEPTION:
            category_totals["perception"] += acc + acc_plus
        elif task in MME_COGNITION:
            category_totals["cognition"] += acc + acc_plus
    metrics.update(category_totals)
    metrics["num_unparsable"] = unparsable
    return metrics
