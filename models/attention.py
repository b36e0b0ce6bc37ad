"""Attention kernels for the LLM beyond transformers' built-ins, chosen by name (recipe ``perf.attention``).

"varlen": packed rows through torch's varlen flash attention, with no [L, L] mask ever built. Sample
boundaries arrive as ``cu_seq_lens`` (cumulative sample lengths over the flattened rows, int32) and the
longest sample ``max_length``: the collator computes both on the host (data.packing.pack),
so the forward needs no device->host sync; without them VLM.forward derives them from position_ids once.

The same kernel serves the Hugging Face families' vision towers (``VISION_VARLEN``): all images of a batch
in one call per block, each image (or Qwen2.5-VL window) attending only to itself.
"""

from __future__ import annotations

import inspect

import torch
from torch.nn.attention.varlen import varlen_attn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask


def sample_boundaries_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seq_lens int32 [n+1], longest sample) of a packed [B, L] batch whose positions restart at 0 at
    each sample (docs/design.md); every row also starts a sample. One host sync (for the longest length):
    the fallback when the batch did not bring its boundaries."""
    flat = position_ids.flatten()
    row_starts = torch.arange(0, flat.numel(), position_ids.shape[1], device=flat.device)
    starts = torch.unique(torch.cat([(flat == 0).nonzero().flatten(), row_starts]))
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


# The name under which a Hugging Face family's vision tower uses the kernel. transformers' Qwen2-VL,
# Qwen2.5-VL and Qwen3-VL vision attention hands the image boundaries (cu_seqlens) only to an implementation
# whose name contains "flash"; any other runs one attention call per image or window, after a device->host
# copy of the boundaries in every block (32 stalls and hundreds of small kernels per forward of a 7B ViT).
VISION_VARLEN = "flash_varlen"


def register_varlen_attention() -> str:
    """Register "varlen" (and ``VISION_VARLEN``) with transformers: rows without a padding mask (packed or
    single samples) go through torch's varlen flash attention (torch.nn.attention.varlen) with the sample
    boundaries the forward passes as ``cu_seq_lens_q`` / ``max_length_q`` (transformers forwards such keyword
    arguments to every attention call); padded batches and generation with a KV cache fall back to SDPA with
    the mask transformers builds. Causal unless the caller passes ``is_causal=False`` (a vision tower).
    Written here because transformers' own varlen paths need the flash-attn package. The function is pure
    (no cache, no sync), so torch.compile traces it and a checkpointed layer's recompute saves exactly what
    its forward saved."""
    takes_is_causal = "is_causal" in inspect.signature(varlen_attn).parameters
    takes_gqa = "enable_gqa" in inspect.signature(varlen_attn).parameters

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        b, h, length, dh = query.shape
        cu = kwargs.get("cu_seq_lens_q")
        if attention_mask is not None or cu is None or key.shape[2] != length:
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        max_len = kwargs["max_length_q"]
        causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
        # Older torch releases spell "causal" as a window: (-1, 0) looks back only, (-1, -1) both ways
        kw = {"is_causal": causal} if takes_is_causal else {"window_size": (-1, 0) if causal else (-1, -1)}
        # Flash kernels take only bf16/fp16; fp32 states appear when norms were upcast (Q-LoRA) or RoPE
        # promoted them under autocast. SDPA casts the same way under autocast.
        dtype = query.dtype if query.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16

        def flat(t):
            return t.transpose(1, 2).reshape(b * length, -1, dh).to(dtype)

        # Grouped-query attention (Qwen2.5-VL, Qwen3-VL: fewer key/value heads than query heads): the flash
        # kernel reads each key/value head for its group of query heads, no copies.
        if takes_gqa and key.shape[1] != h:
            kw["enable_gqa"] = True
        out = varlen_attn(flat(query), flat(key), flat(value), cu, cu, max_len, max_len, scale=scaling, **kw)
        return out.view(b, length, h, dh).to(query.dtype), None

    def mask(*args, **kwargs):  # no padding mask: varlen needs none; otherwise SDPA's
        return None if kwargs.get("attention_mask") is None else sdpa_mask(*args, **kwargs)

    for name in ("varlen", VISION_VARLEN):
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, mask)
    return "varlen"


def set_vision_varlen(vision_config) -> None:
    """Run a Hugging Face family's vision tower (the module holding ``vision_config``) through the varlen
    kernel. Set on the config, which every vision block reads: transformers' ``set_attn_implementation``
    takes a name containing "flash" for the flash-attn package or a hub kernel and refuses this one."""
    register_varlen_attention()
    vision_config._attn_implementation = VISION_VARLEN


def set_attention(vlm, name: str) -> None:
    if name == "varlen":
        register_varlen_attention()
    llm = vlm.llm
    if hasattr(llm, "set_attn_implementation"):
        llm.set_attn_implementation(name)
    else:
        llm.config._attn_implementation = name


def uses_varlen(vlm) -> bool:
    return getattr(vlm.llm.config, "_attn_implementation", None) == "varlen"


def varlen_kwargs(cu_seq_lens: torch.Tensor, max_length: int) -> dict[str, torch.Tensor | int]:
    """The sample boundaries of packed rows as transformers passes them to every attention call (the varlen
    attention above reads them; SDPA and eager ignore them)."""
    return {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": max_length,
        "max_length_k": max_length,
    }
