"""The one place the language-model loss is computed, so a fused linear + cross-entropy kernel
(e.g. liger-kernel) can replace it without touching the model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss_sum(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over supervised tokens.

    hidden [B, L, d] final hidden states; lm_head_weight [V, d]; labels [B, L] aligned with the
    inputs (position t is predicted from position t-1), -100 = ignore.
    Returns (loss_sum fp32 scalar, num_tokens long scalar). Summing (not averaging) lets the trainer
    divide by the supervised-token count of the whole optimiser step across micro-batches and ranks.
    """
    shift_hidden = hidden[:, :-1]
    shift_labels = labels[:, 1:]
    logits = shift_hidden @ lm_head_weight.T
    loss_sum = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    num_tokens = (shift_labels != IGNORE_INDEX).sum()
    return loss_sum, num_tokens
