"""Each metric against hand-computed cases from the official definitions."""

import pytest

from eval_mm.metrics import CoverageError, MetricOptions, compute_metric
from eval_mm.metrics.caption import caption_scores, simple_ptb_tokenize
from eval_mm.metrics.choice import circular_accuracy, mme_parse_yes_no, mme_scores
from eval_mm.metrics.grounding import box_iou, grounding_hit, parse_first_box
from eval_mm.metrics.text_match import (
    anls_question_score,
    gqa_clean_answer,
    levenshtein,
    relaxed_accuracy_score,
)
from eval_mm.metrics.vqa import normalize_prediction, process_punctuation, vqa_question_accuracy

# ------------------------------------------------------------------------------------------ VQA


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Two", "2"),  # number words
        ("none", "0"),
        ("a dog", "dog"),  # articles dropped
        ("The Cat.", "cat"),  # period not before a digit removed, lower-cased
        ("3.5", "3.5"),  # period before a digit kept
        ("1,000", "1000"),  # comma between digits: every mark deleted, not spaced
        ("yes, sir", "yes sir"),  # comma touching a space: deleted
        ("black/white", "black white"),  # slash inside a word: replaced by a space
        ("dont", "don't"),  # contractions table
        ("isnt it", "isn't it"),
        ("  red\n", "red"),
    ],
)
def test_vqa_prediction_normalisation(raw, normalized):
    assert normalize_prediction(raw) == normalized


def test_punctuation_rule_looks_at_the_original_text():
    # "x-y (z)": '(' touches a space so it is deleted; '-' and the final ')' touch no space, so each
    # becomes a space (the trailing space is later removed by split/join in processDigitArticle).
    assert process_punctuation("x-y (z)") == "x y z "


def test_vqa_accuracy_is_mean_of_leave_one_out_min1_matches_over_3():
    # 2 of 10 humans said "2": each of those 2 leave-outs sees 1 match (1/3), the other 8 see 2 (2/3).
    gts = ["2", "2"] + ["3"] * 8
    assert vqa_question_accuracy("two", gts) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    # 3 matches: leave-outs of a match see 2 (2/3), others see 3 (1) -> (3*2/3 + 7) / 10 = 0.9
    assert vqa_question_accuracy("2", ["2"] * 3 + ["4"] * 7) == pytest.approx(0.9)
    assert vqa_question_accuracy("4", ["4"] * 10) == 1.0
    assert vqa_question_accuracy("5", ["4"] * 10) == 0.0


def test_vqa_ground_truth_only_punctuation_processed_when_humans_disagree():
    # All humans agree on "Two": GT untouched, prediction normalised to "2" -> no match (official quirk).
    assert vqa_question_accuracy("Two", ["Two"] * 10) == 0.0
    # Humans disagree: GT gets punctuation processing only ("yes!" -> "yes "), never digit/article.
    assert vqa_question_accuracy("yes", ["yes!"] * 9 + ["no"]) == 0.0  # "yes " != "yes"
    assert vqa_question_accuracy("yes", ["yes"] * 9 + ["no"]) == 1.0


def test_vqa_metric_reports_rounded_percentage():
    # q1: (2 * 1/3 + 8 * 2/3) / 10 = 0.6; q2: 1; q3: one match among 9 others... "4" once -> 9 leave-outs
    # see 1 match (1/3), 1 sees 0 -> 0.3. Mean (0.6 + 1 + 0.3) / 3 = 0.6333.. -> 63.33
    refs = {"1": ["2", "2"] + ["3"] * 8, "2": ["cat"] * 10, "3": ["4"] + ["5"] * 9}
    out = compute_metric("vqa_accuracy", {"1": "2", "2": "the cat", "3": "four"}, refs)
    assert out == {"vqa_accuracy": 63.33, "num_samples": 3}


# ------------------------------------------------------------------------------------------ ANLS


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3


def test_anls_threshold_and_unnormalised_lengths():
    assert anls_question_score("Hello  World", ["hello world"]) == pytest.approx(1.0)
    # one edit over length 4 -> 0.75 kept
    assert anls_question_score("abcd", ["abce"]) == pytest.approx(0.75)
    # two edits over length 4 -> 0.5 is kept (threshold is "< 0.5 -> 0")
    assert anls_question_score("abcd", ["abxy"]) == pytest.approx(0.5)
    # three edits -> 0.25 < 0.5 -> 0
    assert anls_question_score("abcd", ["axyz"]) == 0.0
    # length uses the raw strings: "  ab " (5 chars) vs "ac": distance 1 after normalising, 1 - 1/5
    assert anls_question_score("  ab ", ["ac"]) == pytest.approx(0.8)
    # best over GT answers
    assert anls_question_score("abcd", ["zzzz", "abcd"]) == 1.0


# ------------------------------------------------------------------------------------- ChartQA


def test_relaxed_accuracy_target_is_the_annotation():
    assert relaxed_accuracy_score("104", ["100"]) == 1.0  # |104-100|/100 = 4%
    assert relaxed_accuracy_score("106", ["100"]) == 0.0
    assert relaxed_accuracy_score("50%", ["0.5"]) == 1.0
    assert relaxed_accuracy_score(" Blue ", ["blue"]) == 1.0
    # zero target: no relative error, string match only
    assert relaxed_accuracy_score("0.0", ["0"]) == 0.0
    assert relaxed_accuracy_score("0", ["0"]) == 1.0


def test_relaxed_accuracy_reference_order_divides_by_the_prediction():
    # target 100, prediction 95.5: correct order 4.5% ok; swapped: |100-95.5|/95.5 = 4.7% ok
    # target 100, prediction 95.2: correct 4.8% ok; swapped 5.04% -> wrong
    assert relaxed_accuracy_score("95.2", ["100"]) == 1.0
    assert relaxed_accuracy_score("95.2", ["100"], reference_order=True) == 0.0
    # zero prediction with the swapped order falls back to string match
    assert relaxed_accuracy_score("0", ["0.01"], reference_order=True) == 0.0


# ----------------------------------------------------------------------------------- exact match


def test_exact_match_and_gqa_cleanup():
    assert compute_metric("exact_match", {"0": " Yes"}, {"0": ["yes"]})["accuracy"] == 100.0
    assert gqa_clean_answer("The color is red.") == "red"
    assert gqa_clean_answer("It is a cup of tea") == "cup"
    # literal reference behaviour: "this is a dog".split("is ") == ["th", "", "a dog"] and [1] is ""
    assert gqa_clean_answer("this is a dog") == ""
    assert (
        compute_metric("gqa_accuracy", {"0": "It is the table, I think"}, {"0": ["table"]})["accuracy"]
        == 100.0
    )


# ------------------------------------------------------------------------------------- grounding


def test_parse_first_box():
    assert parse_first_box("(10,20),(30,40) and (1,1),(2,2)") == (10, 20, 30, 40)
    assert parse_first_box("(10,20),(30)") is None
    assert parse_first_box("no box") is None
    assert parse_first_box("(a,b),(c,d)") is None


def test_box_iou_edges():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0  # empty union
    assert box_iou((10, 10, 0, 0), (0, 0, 10, 10)) == 0.0  # inverted box has no area


def test_grounding_rescale_divisor_and_threshold():
    # image 200x100; model box (0,0),(500,1000) -> pixels (0,0,100,100) with /1000
    assert grounding_hit("(0,0),(500,1000)", [0, 0, 100, 100], 200, 100) == (True, True)
    # IoU exactly 0.5 counts: gt (0,0,100,100) vs (0,0,100,50)
    assert grounding_hit("(0,0),(500,500)", [0, 0, 100, 100], 200, 100) == (True, True)
    # /999 maps 999 to the full width
    x = grounding_hit("(0,0),(999,999)", [0, 0, 200, 100], 200, 100, box_divisor=999)
    assert x == (True, True)
    assert grounding_hit("garbage", [0, 0, 1, 1], 10, 10) == (False, False)


def test_grounding_metric_counts_every_sample_and_unparsable():
    refs = {str(i): {"bbox": [0, 0, 100, 100], "width": 100, "height": 100} for i in range(4)}
    preds = {"0": "(0,0),(999,999)", "1": "(0,0),(100,100)", "2": "oops", "3": ""}
    out = compute_metric("grounding", preds, refs)
    assert out == {"accuracy_iou0.5": 25.0, "num_unparsable": 2, "num_samples": 4}


# ---------------------------------------------------------------------------------- multiple choice


def test_circular_eval_needs_every_variant_right():
    correct = {1: True, 1_000_001: True, 2_000_001: True, 2: True, 1_000_002: False, 3: True}
    assert circular_accuracy(correct) == (pytest.approx(2 / 3), 3)


def test_mmbench_metric():
    refs = {"5": "A", "1000005": "B", "7": "C"}
    out = compute_metric("circular_accuracy", {"5": "A", "1000005": "C", "7": "C"}, refs)
    assert out["circular_accuracy"] == 50.0
    assert out["accuracy"] == pytest.approx(200 / 3)
    assert out["num_questions"] == 2


def test_choice_accuracy():
    out = compute_metric("choice_accuracy", {"0": "B", "1": "A"}, {"0": "B", "1": "C"})
    assert out["accuracy"] == 50.0


def test_mme_parse_and_acc_plus():
    assert mme_parse_yes_no("Yes, there is") == "yes"
    assert mme_parse_yes_no("No.") == "no"
    assert mme_parse_yes_no("There is no dog") == "other"  # 'no' not in the first 4 characters
    records = [
        ("existence", "a.jpg", "yes", "yes"),
        ("existence", "a.jpg", "no", "no"),  # image a: both right
        ("existence", "b.jpg", "yes", "yes"),
        ("existence", "b.jpg", "no", "yes"),  # image b: one right
        ("code_reasoning", "c.png", "yes", "maybe"),
        ("code_reasoning", "c.png", "no", "no"),
    ]
    out = mme_scores(records)
    assert out["existence/acc"] == 75.0 and out["existence/acc_plus"] == 50.0
    assert out["existence/score"] == 125.0
    assert out["code_reasoning/score"] == 50.0 + 0.0
    assert out["perception"] == 125.0 and out["cognition"] == 50.0
    assert out["num_unparsable"] == 1


# ---------------------------------------------------------------------------------- captioning


def test_python_tokenizer_fallback_strips_punctuation_like_ptb():
    out = simple_ptb_tokenize({"1": ["A Dog, running (fast)!", "It's the man's"]})
    assert out["1"] == ["a dog running fast", "it 's the man 's"]


@pytest.mark.parametrize("java", [True, False])
def test_caption_scores_perfect_and_wrong(monkeypatch, java):
    import eval_mm.metrics.caption as caption

    if not java:
        monkeypatch.setattr(caption, "java_available", lambda: False)
    elif not caption.java_available():
        pytest.skip("Java not installed")
    refs = {
        "1": ["a dog runs on the beach", "a dog on a beach"],
        "2": ["a red car parked on a street", "red car"],
    }
    perfect = caption_scores({"1": "a dog runs on the beach", "2": "a red car parked on a street"}, refs)
    wrong = caption_scores({"1": "blue sky", "2": "blue sky"}, refs)
    assert perfect["BLEU_1"] == pytest.approx(100.0) and perfect["CIDEr"] > wrong["CIDEr"] == 0.0
    assert perfect["tokenizer"] == ("ptb" if java else "python_fallback")


# ---------------------------------------------------------------------------------- coverage


def test_predictions_must_cover_annotation_ids():
    with pytest.raises(CoverageError, match=r"2 annotation ids have no prediction \(e.g. \['b', 'c'\]\)"):
        compute_metric("exact_match", {"a": "x"}, {"a": ["x"], "b": ["y"], "c": ["z"]}, where="t")
    with pytest.raises(CoverageError, match="not in the annotations"):
        compute_metric("exact_match", {"a": "x", "q": "y"}, {"a": ["x"]})


def test_options_are_passed_through():
    refs = {"0": ["100"]}
    assert compute_metric("relaxed_accuracy", {"0": "95.2"}, refs)["relaxed_accuracy"] == 100.0
    opts = MetricOptions(chartqa_reference_order=True)
    assert compute_metric("relaxed_accuracy", {"0": "95.2"}, refs, opts)["relaxed_accuracy"] == 0.0
