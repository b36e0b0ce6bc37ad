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
