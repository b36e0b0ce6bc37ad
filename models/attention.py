"""Attention kernels for the LLM beyond transformers' built-ins, chosen by name (recipe ``perf.attention``).

"varlen": packed rows through torch's varlen flash attention, sample boundaries from position_ids
(docs/design.md: positions restart at 0 at each packed sample), with no [L, L] mask ever built.
"""

from __future__ import annotations

import torch

_VARLEN_CACHE: dict = {}


def register_varlen_attention() -> str:
    """Register "varlen" with transformers: rows without a padding mask (packed or single samples) go
    through torch's varlen flash attention (torch.nn.attention.varlen) with sample boundaries from
    position_ids, and no [L, L] mask is ever built; padded batches and generation with a KV cache fall
    back to SDPA with the mask transformers builds. Written here because transformers' own varlen paths
    need the flash-attn package."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    causal_kw = ({"is_causal": True} if "is_causal" in inspect.signature(varlen_attn).parameters
                 else {"window_size": (-1, 0)})

    def boundaries(position_ids: torch.Tensor):
        # Once per forward (every layer, and the checkpointed recompute, get the same position_ids
        # object): one host sync. The cache holds the tensor itself, so a later batch allocated at the
        # same address can never hit it.
        if _VARLEN_CACHE.get("key") is not position_ids:
            flat = position_ids.flatten()
            # A sample starts where its positions restart at 0, and every row starts a new one.
            row_starts = torch.arange(0, flat.numel(), position_ids.shape[1], device=flat.device)
            starts = torch.unique(torch.cat([(flat == 0).nonzero().flatten(), row_starts]))
            cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
            _VARLEN_CACHE.update(key=position_ids, value=(cu, position_ids.shape[1]))
        return _VARLEN_CACHE["value"]

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        b, h, length, dh = query.shape
        if attention_mask is not None or kwargs.get("position_ids") is None or key.shape[2] != length:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        cu, max_len = boundaries(kwargs["position_ids"])
        # Flash kernels take only bf16/fp16; fp32 states appear when norms were upcast (Q-LoRA) or RoPE
        # promoted them under autocast. SDPA casts the same way under autocast.
        dtype = query.dtype if query.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16

        def flat(t):
            return t.transpose(1, 2).reshape(b * length, -1, dh).to(dtype)

        out = varlen_attn(flat(query), flat(key), flat(value), cu, cu, max_len, max_len, scale=scaling, **causal_kw)
        return out.view(b, length, h, dh).to(query.dtype), None

    AttentionInterface.register("varlen", attention)
    def mask(*args, **kwargs):  # no padding mask: varlen needs none; otherwise SDPA's
        return None if kwargs.get("attention_mask") is None else sdpa_mask(*args, **kwargs)

    AttentionMaskInterface.register("varlen", mask)
    return "varlen"


def set_attention(vlm, name: str) -> None:
    if name == "varlen":
        register_varlen_attention()
    llm = vlm.llm
    if hasattr(llm, "set_attn_implementation"):
        llm.set_attn_implementation(name)
    else:
        llm.config._attn_implementation = name
