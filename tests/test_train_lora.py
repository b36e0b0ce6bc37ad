"""LoRA: adapters only where asked, trained embeddings + resampler saved in the adapter,
save -> load -> merge gives the same outputs. Q-LoRA on a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from models.loading import apply_adapter
from train.freeze import apply_freezing
from train.lora import apply_lora
from train.recipe import FreezeSection, LoraSection, QuantizationSection


def _perturb_trainable(model):
    # LoRA B starts at zero (a no-op adapter); move every trainable tensor so the test can fail.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_lora_save_load_merge_give_the_same_outputs(tiny_vlm, tmp_path):
    base = copy.deepcopy(tiny_vlm)
    base.config.train_embeddings = True  # special tokens were added: embeddings + head must train
    freeze = FreezeSection(vision="frozen", resampler="train", llm="frozen", embeddings="auto")
    apply_freezing(base, freeze)
    reference_base = copy.deepcopy(base)
    model = apply_lora(base, LoraSection(enabled=True, r=4, alpha=8, dropout=0.0), freeze)

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n and "llm.model.layers.0.self_attn.q_proj" in n for n in names)
    assert not any("lora_" in n and ("vision" in n or "resampler" in n or "down_proj" in n) for n in names)
    _perturb_trainable(model)
    model.eval()
    ids = torch.tensor([[30, 40, 41, 42, 43, 44]])  # no special tokens
    want = model(ids).logits

    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for part in ("embed_tokens", "lm_head", "resampler.query", "lora_A", "lora_B"):
        assert any(part in k for k in saved), f"{part} missing from the saved adapter"

    loaded = apply_adapter(copy.deepcopy(reference_base), tmp_path / "adapter", merge=False).eval()
    torch.testing.assert_close(loaded(ids).logits, want)
    merged = apply_adapter(copy.deepcopy(reference_base), tmp_path / "adapter", merge=True).eval()
    assert type(merged).__name__ == "VLM"
    torch.testing.assert_close(merged(ids).logits, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(reference_base.eval()(ids).logits, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_trains_4bit_decoder(tiny_vlm):
    import bitsandbytes as bnb

    from train.lora import quantize_llm_4bit

    model = copy.deepcopy(tiny_vlm)
    freeze = FreezeSection(vision="frozen", resampler="train", llm="frozen")
    apply_freezing(model, freeze)
    quantize_llm_4bit(model, QuantizationSection(enabled=True), torch.device("cuda"))
    assert isinstance(model.llm.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    model = apply_lora(model, LoraSection(enabled=True, r=4), freeze).cuda().train()
    ids = torch.randint(20, 500, (2, 16), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
