"""Every optimisation of train.bench's "ours" path keeps the loss (and gradients) of the plain path,
within bf16 tolerance, on the GPU: fused linear cross-entropy (liger) and its chunked fallback,
packed rows with attention confined to each sample (sdpa dense mask, flex_attention block mask,
varlen flash attention), selective checkpointing, compiled blocks, and all of them together.

    pytest tests/test_perf_equivalence.py -m gpu -q      (on the GPU machine)
"""

import copy

import pytest
import torch

from models import loss as loss_mod
from models.loss import causal_lm_loss_sum
from models.tokens import image_token_ids

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BF16 = dict(rtol=2e-2, atol=2e-2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


@pytest.mark.parametrize("impl", ["chunked", "liger"])
def test_fused_loss_matches_full_logits_at_qwen_vocab(impl, monkeypatch):
    if impl == "liger":
        pytest.importorskip("liger_kernel", reason="liger-kernel is an optional dependency")
    monkeypatch.setattr(loss_mod, "CHUNK_TOKENS", 500)
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(2, 700, 256, device="cuda", generator=gen).bfloat16()
    weight = (0.05 * torch.randn(151936, 256, device="cuda", generator=gen)).bfloat16()
    labels = torch.randint(0, 151936, (2, 700), device="cuda", generator=gen)
    labels[:, :300] = -100
    out = []
    for name in ("torch", impl):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss_sum, n = causal_lm_loss_sum(h, w, labels, impl=name)
        loss_sum.backward()
        out.append((loss_sum, n, h.grad, w.grad))
    (ref, n_ref, gh_ref, gw_ref), (got, n_got, gh, gw) = out
    assert got.dtype == torch.float32 and int(n_got) == int(n_ref)
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=1e-2)
    assert rel_err(gh, gh_ref) < 2e-2 and rel_err(gw, gw_ref) < 2e-2


# ------------------------------------------------------------------------------- model-level checks
def samples(model, tok, lengths=(60, 45, 80), seed=0):
    """Samples with one image each and random text; labels on the text after the image."""
    gen = torch.Generator().manual_seed(seed)
    ids = image_token_ids(tok)
    span = [ids.start] + [ids.pad] * model.config.num_image_tokens + [ids.end]
    special = set(tok.all_special_ids) | {ids.start, ids.end, ids.pad}
    vocab = torch.tensor([i for i in range(len(tok)) if i not in special])
    out = []
    for n in lengths:
        text = vocab[torch.randint(0, len(vocab), (n,), generator=gen)].tolist()
        row = torch.tensor(text[:5] + span + text[5:])
        labels = row.clone()
        labels[: 5 + len(span)] = -100
        out.append((row, labels))
    pixels = torch.randn(len(lengths), 3, 84, 84, generator=gen)
    return out, pixels


def packed(items, pad_id, tail=3):
    ids = torch.cat([r for r, _ in items] + [torch.full((tail,), pad_id)])
    labels = torch.cat([lab for _, lab in items] + [torch.full((tail,), -100)])
    positions = torch.cat([torch.arange(len(r)) for r, _ in items] + [torch.arange(tail)])
    return ids[None].cuda(), labels[None].cuda(), positions[None].cuda()


def reference(model, items, pixels):
    """The plain path: each sample alone, sdpa, full-logits loss. Returns (loss_sum, grads)."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for i, (row, labels) in enumerate(items):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(row[None].cuda(), pixel_values=pixels[i : i + 1].cuda(), labels=labels[None].cuda())
        out.loss_sum.backward()
        total += out.loss_sum.detach()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def optimised(model, items, pixels, pad_id):
    model.zero_grad(set_to_none=True)
    ids, labels, positions = packed(items, pad_id)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids, pixel_values=pixels.cuda(), position_ids=positions, labels=labels)
    out.loss_sum.backward()
    return out.loss_sum.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.fixture
def cuda_vlm(tiny_vlm):
    model = copy.deepcopy(tiny_vlm).cuda().train()
    model.vision.requires_grad_(False)  # SFT: ViT frozen (runs under no_grad), resampler + LLM train
    return model


def assert_same(got, ref):
    loss, grads = got
    ref_loss, ref_grads = ref
    torch.testing.assert_close(loss, ref_loss, **BF16)
    assert grads.keys() == ref_grads.keys()
    worst = max((rel_err(grads[n], g), n) for n, g in ref_grads.items())
    assert worst[0] < 3e-2, f"gradient of {worst[1]} differs by {worst[0]:.3g} (relative norm)"


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention", "varlen"])
def test_packed_rows_match_separate_samples(cuda_vlm, tiny_tokenizer, attn):
    from models.attention import set_attention

    items, pixels = samples(cuda_vlm, tiny_tokenizer)
    ref = reference(cuda_vlm, items, pixels)
    set_attention(cuda_vlm, attn)
    assert_same(optimised(cuda_vlm, items, pixels, tiny_tokenizer.pad_token_id), ref)


@pytest.mark.parametrize("loss_impl", ["chunked", "liger"])
def test_fused_loss_in_the_model(cuda_vlm, tiny_tokenizer, loss_impl):
    if loss_impl == "liger":
        pytest.importorskip("liger_kernel", reason="liger-kernel is an optional dependency")
    items, pixels = samples(cuda_vlm, tiny_tokenizer)
    ref = reference(cuda_vlm, items, pixels)
    cuda_vlm.runtime.loss_impl = loss_impl
    assert_same(optimised(cuda_vlm, items, pixels, tiny_tokenizer.pad_token_id), ref)


def test_selective_checkpointing_and_compiled_blocks(cuda_vlm, tiny_tokenizer):
    items, pixels = samples(cuda_vlm, tiny_tokenizer)
    ref = reference(cuda_vlm, items, pixels)
    cuda_vlm.set_gradient_checkpointing(True, llm_layers=1)
    cuda_vlm.compile_blocks(vision=True, llm=True)
    assert_same(optimised(cuda_vlm, items, pixels, tiny_tokenizer.pad_token_id), ref)


def test_everything_together_as_the_bench_runs_it(cuda_vlm, tiny_tokenizer):
    from models.attention import set_attention

    items, pixels = samples(cuda_vlm, tiny_tokenizer, lengths=(30, 90, 50, 70))
    ref = reference(cuda_vlm, items, pixels)
    set_attention(cuda_vlm, "varlen")
    cuda_vlm.runtime.loss_impl = "auto"
    cuda_vlm.runtime.check_image_spans = False
    cuda_vlm.set_gradient_checkpointing(True, llm_layers=1)
    cuda_vlm.compile_blocks(vision=True, llm=False)
    assert_same(optimised(cuda_vlm, items, pixels, tiny_tokenizer.pad_token_id), ref)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("causal", [True, False], ids=["decoder", "vision"])
def test_varlen_attention_confines_each_sample_with_grouped_query_heads(kv_heads, causal):
    """Qwen2.5-VL and Qwen3-VL have fewer key/value heads than query heads: a packed row through "varlen"
    equals attention over each sample alone, the key/value heads repeated for their query groups. Causal for
    a decoder; both ways when the caller says ``is_causal=False``, as the families' vision towers do."""
    from transformers.integrations.sdpa_attention import repeat_kv
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from models.attention import register_varlen_attention

    attention = ALL_ATTENTION_FUNCTIONS[register_varlen_attention()]
    gen = torch.Generator(device="cuda").manual_seed(0)
    lengths, heads, dh = [5, 11, 8], 4, 64
    total = sum(lengths)
    q, k, v = (
        torch.randn(1, h, total, dh, device="cuda", generator=gen).bfloat16()
        for h in (heads, kv_heads, kv_heads)
    )
    cu = torch.tensor([0, 5, 16, 24], device="cuda", dtype=torch.int32)
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    module.is_causal = True
    extra = {} if causal else {"is_causal": False}
    out, _ = attention(module, q, k, v, None, scaling=dh**-0.5, cu_seq_lens_q=cu, max_length_q=11, **extra)
    expected = []
    for start, n in zip(cu[:-1].tolist(), lengths):
        part = slice(start, start + n)
        qs, ks, vs = (
            q[:, :, part],
            repeat_kv(k[:, :, part], heads // kv_heads),
            repeat_kv(v[:, :, part], heads // kv_heads),
        )
        expected.append(
            torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(1, 2)
        )
    torch.testing.assert_close(out, torch.cat(expected, dim=1), **BF16)
