"""train.bench picks the data a recipe trains on: SFT recipes the world's conversations, DPO recipes its
preference pairs (a DPO recipe on conversations would stop at its first record)."""

from pathlib import Path

import pytest

from models.errors import UserError
from train.bench import workload_overrides


def test_an_sft_recipe_is_timed_on_the_worlds_conversations():
    overrides = workload_overrides("world", Path("/w"))
    assert "data.paths=[/w/sft.json]" in overrides
    assert "model.tokenizer_path=/w/tokenizer" in overrides


def test_a_dpo_recipe_is_timed_on_the_worlds_preference_pairs():
    assert "data.paths=[/w/dpo.json]" in workload_overrides("world", Path("/w"), preference=True)


def test_a_dpo_recipe_on_long_conversations_is_refused_with_a_reason():
    with pytest.raises(UserError, match="DPO recipe runs on the 'world' workload"):
        workload_overrides("2048", Path("/w"), preference=True)


def test_the_summary_gives_the_window_average_and_the_median_step():
    """tokens/s over the timed window (all its tokens over all its seconds) and the median step's rate: a step
    that meets new shapes pays a one-time cost, which the mean of a short window carries
    and the median not."""
    from train.bench import summarise

    rows = [
        {
            "step": s,
            "tokens": 6000,
            "window_s": w,
            "samples_per_s": 16 / w,
            "time": 100.0 + s,
            "loss": 2.0,
            "peak_mem_gib": 24.0,
        }
        for s, w in [(1, 20.0), (2, 0.6), (3, 0.6), (4, 1.2), (5, 0.5)]
    ]
    result = summarise("world", "recipe", launched=90.0, rows=rows, warmup=1, error="")
    assert result.steps == 4 and result.startup_s == 11.0
    assert result.tokens_per_s == 24000 / 2.9
    assert result.median_tokens_per_s == 10000.0  # steps of 10,000 / 10,000 / 5,000 / 12,000 tok/s
