"""The one place the language-model loss is computed, so a fused linear + cross-entropy kernel can
replace it without touching the model.

Three implementations of the same number, chosen by ``impl`` (``VLM.runtime.loss_impl``):
- ``"torch"``: logits for every position, then ``F.cross_entropy`` in fp32. Simple; at Qwen's 151,936-token
  vocabulary it materialises [tokens, V] fp32 logits (about 13.9 GiB extra at 8,192 tokens).
- ``"chunked"``: pure torch, the same maths over chunks of tokens, each chunk checkpointed so only one
  chunk's logits exist at a time (one extra lm_head matmul in backward, ~2% of a 7B step).
- ``"liger"``: liger-kernel's fused linear cross-entropy (optional dependency, CUDA): logits are computed
  and turned into gradients chunk by chunk inside the forward, never stored.
- ``"auto"``: liger when it is importable and the tensors are on CUDA, else chunked.

Preference training (DPO) needs each labelled token's log-probability, not their sum:
``causal_lm_token_logps`` gives them with the same implementations (liger's per-token mode is not used:
its ``reduction="none"`` gradients were wrong, Liger-Kernel#968 and PR #1298, so "liger" and "auto"
take the chunked path there), and ``sum_per_sequence`` adds them up per packed or padded sequence.
The SFT path above is untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
LOSS_IMPLS = ("torch", "chunked", "liger", "auto")
CHUNK_TOKENS = 2048  # chunked: [2048, 151936] fp32 logits = 1.2 GiB live at a time


def causal_lm_loss_sum(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    impl: str = "torch",
    label_positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over supervised tokens.

    hidden [B, L, d] final hidden states; lm_head_weight [V, d]; labels [B, L] aligned with the
    inputs (position t is predicted from position t-1), -100 = ignore.
    ``label_positions`` (optional): the flat indices into [B * L] of every supervised label that is
    predicted (label != -100, column >= 1), as the collator ships them (data.packing.supervised_positions).
    With them the LM head and the loss run only at those positions: the same sum, without the [tokens, V]
    logits of the prompt and image tokens (most of an SFT row) and without a device->host sync to find them.
    Returns (loss_sum fp32 scalar, num_tokens long scalar). Summing (not averaging) lets the trainer
    divide by the supervised-token count of the whole optimiser step across micro-batches and ranks.
    """
    if impl not in LOSS_IMPLS:
        raise ValueError(f"loss impl {impl!r}: expected one of {LOSS_IMPLS}")
    if label_positions is not None:
        # Label at flat position p (row b, column t >= 1) is predicted from the hidden state at p - 1.
        shift_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, label_positions - 1)
        shift_labels = labels.reshape(-1).index_select(0, label_positions)
    else:
        shift_hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        shift_labels = labels[:, 1:].reshape(-1)
    num_tokens = (shift_labels != IGNORE_INDEX).sum()
    if impl == "auto":
        impl = "liger" if hidden.is_cuda and _liger_available() else "chunked"
    if impl == "liger":
        loss_sum = _liger_loss_sum(shift_hidden, lm_head_weight, shift_labels)
    elif impl == "chunked":
        loss_sum = _chunked_loss_sum(shift_hidden, lm_head_weight, shift_labels)
    else:
        loss_sum = _ce_sum(shift_hidden, lm_head_weight, shift_labels)
    return loss_sum.float(), num_tokens


def causal_lm_token_logps(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, impl: str = "torch"
) -> torch.Tensor:
    """log p(label_t | tokens < t) for every position, [B, L] fp32, aligned with ``labels``: 0 where the
    label is -100 and in column 0 (never predicted). ``-token_logps.sum()`` is ``causal_lm_loss_sum``."""
    if impl not in LOSS_IMPLS:
        raise ValueError(f"loss impl {impl!r}: expected one of {LOSS_IMPLS}")
    shift_hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    if impl == "torch":
        nll = _ce_per_token(shift_hidden, lm_head_weight, shift_labels)
    else:  # chunked, liger, auto: see the module docstring
        nll = torch.cat(
            [
                checkpoint(_ce_per_token, h, lm_head_weight, y, use_reentrant=False)
                if torch.is_grad_enabled() and (h.requires_grad or lm_head_weight.requires_grad)
                else _ce_per_token(h, lm_head_weight, y)
                for h, y in zip(shift_hidden.split(CHUNK_TOKENS), shift_labels.split(CHUNK_TOKENS))
            ]
        )
    logps = -nll.float().view(labels.shape[0], -1)
    return F.pad(logps, (1, 0))


def sum_per_sequence(
    token_logps: torch.Tensor, sequence_ids: torch.Tensor, num_sequences: int
) -> torch.Tensor:
    """Sum token log-probs [B, L] into their sequences: ``sequence_ids`` [B, L] gives each position's
    sequence (0 .. num_sequences-1, row-major over packed or padded rows; -1 on padding, whose log-probs
    are 0). Returns [num_sequences] fp32."""
    index = sequence_ids.clamp(min=0).reshape(-1)  # padding adds its zeros to sequence 0: harmless
    out = token_logps.new_zeros(num_sequences)
    return out.index_add(0, index, token_logps.reshape(-1))


def _ce_per_token(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.T
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")


def _ce_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.T
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def _chunked_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], CHUNK_TOKENS):
        h, y = hidden[start : start + CHUNK_TOKENS], labels[start : start + CHUNK_TOKENS]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            # Checkpointed: backward recomputes this chunk's logits instead of keeping them.
            total = total + checkpoint(_ce_sum, h, weight, y, use_reentrant=False)
        else:
            total = total + _ce_sum(h, weight, y)
    return total


def _liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401  (optional heavy dependency: the gpu extra)
    except ImportError:
        return False
    return True


_LIGER_LOSS = None


def _liger_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    global _LIGER_LOSS
    if _LIGER_LOSS is None:
        try:
            # optional heavy dependency (the gpu extra), imported when the fused loss first runs
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError as e:
            raise ImportError(
                "loss impl 'liger' needs liger-kernel (pip install 'vlrecipe[gpu]'); "
                "or use 'chunked', its pure-torch equivalent"
            ) from e
        _LIGER_LOSS = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    # liger's kernel is not autocast-aware and needs one dtype for input and weight: use the dtype the
    # torch path's matmul would run in (the autocast dtype, else the hidden states'). Softmax and
    # accumulation happen in fp32 inside the kernel either way.
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(device, enabled=False):
        return _LIGER_LOSS(weight.to(dtype), hidden.to(dtype).contiguous(), labels.contiguous())
