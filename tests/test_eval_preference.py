"""eval_mm's preference benchmark (synth_preference): the margin log p(chosen) - log p(rejected) of each
held-out pair, scored by the training code's rendering and log-probs, and the accuracy over pairs."""

import json

import pytest
import torch

from data.chatml import render_preference_pair
from data.formats import load_records
from data.images import load_image
from eval_mm.metrics import compute_metric

N_EVAL = 6


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from data.synthetic import generate

    root = tmp_path_factory.mktemp("pref_data")
    generate(root / "synthetic", seed=0, n_train=4, n_eval=N_EVAL, image_size=56, vocab_size=300)
    return root


def test_preference_accuracy_is_the_share_of_pairs_whose_chosen_answer_is_likelier():
    scores = compute_metric(
        "preference", {"a": 2.0, "b": -0.5, "c": 0.0, "d": 1.5}, dict.fromkeys("abcd", "chosen")
    )
    assert scores == {"accuracy": 50.0, "mean_margin": 0.75, "num_samples": 4}  # a tie is not a win


def test_synth_preference_scores_every_held_out_pair_with_its_margin(data_root, tmp_path, tiny_tokenizer):
    from eval_mm.runner import evaluate
    from models import build_vlm, load_tokenizer, presets

    tokenizer = load_tokenizer(data_root / "synthetic" / "tokenizer")
    torch.manual_seed(0)
    model = build_vlm(presets.tiny(vocab_size=len(tokenizer)), tokenizer=tokenizer).eval()
    results = evaluate(
        model,
        tokenizer,
        ["synth_preference"],
        data_root,
        tmp_path,
        batch_size=4,
        prompt_format="chatml",
        progress=False,
    )
    scores = results["synth_preference"]
    records, _ = load_records(data_root / "synthetic" / "dpo_test.json")  # several pairs per held-out image
    assert scores["num_samples"] == len(records) > N_EVAL and 0.0 <= scores["accuracy"] <= 100.0
    predictions = [
        json.loads(line)
        for line in (tmp_path / "synth_preference" / "predictions.jsonl").read_text().splitlines()
    ]
    assert [p["id"] for p in predictions] == [r["id"] for r in records]
    assert scores["accuracy"] == pytest.approx(
        100 * sum(p["prediction"] > 0 for p in predictions) / len(records)
    )

    # Record 0 scored by hand: each answer's tokens' log-probs under the model, summed.
    pair = render_preference_pair(
        tokenizer,
        records[0]["conversations"],
        records[0]["chosen"],
        records[0]["rejected"],
        model.config.num_image_tokens,
    )
    pixels = torch.stack([load_image(p, model.config.vision.image_size) for p in pair[0].image_paths])
    logps = []
    with torch.no_grad():
        for sample in pair:
            ids, labels = torch.tensor([sample.input_ids]), torch.tensor([sample.labels])
            logp = torch.log_softmax(model(ids, pixel_values=pixels).logits[0, :-1].float(), -1)
            keep = labels[0, 1:] != -100
            logps.append(logp[keep].gather(-1, labels[0, 1:][keep][:, None]).sum().item())
    assert predictions[0]["prediction"] == pytest.approx(logps[0] - logps[1], abs=1e-4)


def test_reward_accuracy_is_the_share_of_pairs_whose_margin_grew_over_the_reference():
    """DPO's implicit reward beta * ((policy margin) - (reference margin)) is positive: TRL's
    rewards/accuracies, on held-out pairs. A pair whose margin did not move is not a win."""
    from eval_mm.metrics import CoverageError, reward_accuracy

    policy, reference = {"a": 2.0, "b": -0.5, "c": 1.0, "d": 3.0}, {"a": 1.0, "b": -1.5, "c": 1.0, "d": 4.0}
    assert reward_accuracy(policy, reference) == {
        "reward_accuracy": 50.0,
        "mean_margin_change": 0.25,
        "num_pairs": 4,
    }
    with pytest.raises(CoverageError, match="cover different pairs"):
        reward_accuracy(policy, {"a": 1.0})


def test_a_margin_change_of_float_noise_is_not_a_won_pair():
    """A model scored against itself (or a policy still equal to its reference) differs by rounding only:
    such pairs are within REWARD_MARGIN_TOLERANCE nats and none is won, whatever the noise's sign."""
    from eval_mm.metrics import REWARD_MARGIN_TOLERANCE, reward_accuracy

    reference = {"a": -3.0, "b": 2.0, "c": 0.5, "d": 1.0}
    noisy = {"a": -3.0 + 1e-7, "b": 2.0 + 3e-7, "c": 0.5 - 1e-7, "d": 1.0 + 2 * REWARD_MARGIN_TOLERANCE}
    assert reward_accuracy(noisy, reference)["reward_accuracy"] == 25.0  # d only


def test_score_cli_adds_the_reward_accuracy_against_a_reference_models_predictions(data_root, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from eval_mm.benchmarks import get_benchmark
    from eval_mm.datasets import load_references

    bench = get_benchmark("synth_preference")
    annotations = data_root / bench.test_file
    ids = sorted(load_references(bench, annotations))
    policy, reference = tmp_path / "dpo.jsonl", tmp_path / "sft.jsonl"
    policy.write_text("".join(json.dumps({"id": k, "prediction": 1.0 + i}) + "\n" for i, k in enumerate(ids)))
    reference.write_text("".join(json.dumps({"id": k, "prediction": 2.0}) + "\n" for k in ids))

    def score(*extra):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "eval_mm",
                "score",
                "--bench",
                "synth_preference",
                "--predictions",
                str(policy),
                "--annotations",
                str(annotations),
                *extra,
            ],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=120,
        )

    out = score("--reference-predictions", str(reference))
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout.strip().splitlines()[-1])
    n = len(ids)  # margins 1, 2, ..., n against 2 everywhere: n - 2 pairs grew
    assert metrics["num_pairs"] == metrics["num_samples"] == n and metrics["accuracy"] == 100.0
    assert metrics["reward_accuracy"] == pytest.approx(100.0 * (n - 2) / n)
    reference.write_text("".join(json.dumps({"id": k, "prediction": 2.0}) + "\n" for k in ids[1:]))
    out = score("--reference-predictions", str(reference))
    assert out.returncode != 0 and "error:" in out.stderr and "cover different pairs" in out.stderr
    assert "Traceback" not in out.stderr
