"""String-answer metrics of the reference's evaluate_vqa.py: ANLS, ChartQA relaxed accuracy, exact match.

Hand-written: they are a few lines each in the reference and no maintained package exposes them with
the reference's exact conventions (unnormalised ANLS lengths, pix2struct percent handling).
"""


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls_question_score(prediction: str, gt_answers: list[str], threshold: float = 0.5) -> float:
    """1 - min normalised Levenshtein distance over the GT answers, zeroed below `threshold`.

    Distances are between whitespace/case-normalised strings but divided by the length of the
    *unnormalised* strings (as infographicsvqa_eval.py does, upper-cased, so 'ß' counts as 2)."""
    if not gt_answers:
        raise ValueError("an ANLS question needs at least one ground-truth answer")
    pred_norm = " ".join(prediction.strip().lower().split())
    distances = []
    for answer in gt_answers:
        gt_norm = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        distances.append(0.0 if length == 0 else levenshtein(gt_norm, pred_norm) / length)
    score = 1.0 - min(distances)
    return 0.0 if score < threshold else score


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(target: str, prediction: str, max_relative_change: float = 0.05) -> bool:
    """pix2struct's rule: numbers within 5% of a non-zero target, else case-insensitive equality."""
    prediction_float = _to_float(prediction)
    target_float = _to_float(target)
    if prediction_float is not None and target_float:
        return abs(prediction_float - target_float) / abs(target_float) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_accuracy_score(prediction: str, annotations: list[str], reference_order: bool = False) -> float:
    """Max over annotations. The reference called relaxed_correctness(model_answer, annotation), i.e.
    with the target and prediction swapped; `reference_order=True` reproduces that."""
    prediction = prediction.strip()
    if reference_order:
        return float(max(relaxed_correctness(prediction, ann) for ann in annotations))
    return float(max(relaxed_correctness(ann, prediction) for ann in annotations))


def exact_match_score(prediction: str, annotations: list[str]) -> float:
    return float(max(prediction.strip().lower() == ann.strip().lower() for ann in annotations))


def gqa_clean_answer(response: str) -> str:
    """The reference's GQA heuristics, reproduced literally (note `split(x)[1]` keeps only the piece
    between the first and second occurrence of x, and 'is ' also matches inside 'this ')."""
    response = response.strip().split(".")[0].split(",")[0].split("!")[0].lower()
    for marker in ("is ", "are ", "a ", "an ", "the "):
        if marker in response:
            response = response.split(marker)[1]
    if " of" in response:
        response = response.split(" of")[0]
    return response.strip()
