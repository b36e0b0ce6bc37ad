"""Preference accuracy on held-out pairs: does the model give the chosen answer a higher log-probability
than the rejected one? The score of an answer is the sum of its tokens' log-probs, the quantity DPO trains
(train/dpo.py); pairs are rendered, batched and scored by the training code itself (data.chatml's
``render_preference_pair``, data.collate, models.loss), so evaluation and training cannot disagree.
Preference records are conversations: they are always rendered as ChatML, whatever the prompt format.

The prediction of a pair is its margin log p(chosen) - log p(rejected); the metric (eval_mm.metrics
"preference") reports the share of positive margins and their mean.
"""

from __future__ import annotations

from typing import Any

import torch

from data.collate import Collator
from data.dataset import DataConfig, SampleBuilder
from eval_mm.datasets import EvalSample
from models.loss import sum_per_sequence
from models.tokens import ENDOFTEXT

NO_TRUNCATION = 1 << 30  # evaluation scores whole answers


class PairBatchBuilder:
    """Collate function: preference samples (``EvalSample.record``) -> a padded batch of pairs
    (data.collate)."""

    def __init__(self, tokenizer, bench_name: str, num_image_tokens: int, image_size: int):
        config = DataConfig(paths=[], image_size=image_size, max_len=NO_TRUNCATION)
        self.builder = SampleBuilder(tokenizer, num_image_tokens, config)
        self.collate = Collator(
            pad_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT), image_size=image_size, row_len=NO_TRUNCATION
        )
        self.bench_name = bench_name

    def __call__(self, samples: list[EvalSample]) -> dict[str, Any]:
        items = [self.builder.build_pair(s.record, where=f"{self.bench_name} sample {s.id}") for s in samples]
        batch = self.collate(items)
        batch.pop("_stats")
        batch["samples"] = samples
        return batch


@torch.no_grad()
def score_pairs(model, batch: dict[str, Any], device: torch.device) -> list[float]:
    """log p(chosen) - log p(rejected) per pair, each summed over the answer's labelled tokens."""
    out = model(
        batch["input_ids"].to(device),
        pixel_values=batch["pixel_values"].to(device, next(model.parameters()).dtype),
        attention_mask=batch["attention_mask"].to(device),
        position_ids=batch["position_ids"].to(device),
        labels=batch["labels"].to(device),
        image_index=batch["image_index"].to(device),
        return_token_logps=True,
    )
    logps = sum_per_sequence(out.token_logps, batch["sequence_ids"].to(device), 2 * batch["num_pairs"]).view(
        -1, 2
    )
    return (logps[:, 0] - logps[:, 1]).tolist()
