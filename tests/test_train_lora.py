"""LoRA: adapters only where asked, trained embeddings + resampler saved in the adapter,
save -> load -> merge gives the same outputs. Q-LoRA on a GPU."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

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
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.device))


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


VISION_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


def image_inputs(model, seed=0):
    """One image span and its pixels, so the vision tower's adapters matter."""
    cfg = model.config
    ids = torch.tensor(
        [
            [30, 40, cfg.image_start_id]
            + [cfg.image_pad_id] * cfg.num_image_tokens
            + [cfg.image_end_id, 41, 42, 43]
        ]
    )
    return ids, torch.randn(1, 3, 84, 84, generator=torch.Generator().manual_seed(seed))


def test_vision_lora_trains_adapters_on_the_vit_and_nothing_else_of_it(tiny_vlm):
    base = copy.deepcopy(tiny_vlm)
    freeze = FreezeSection(vision="frozen", resampler="train", llm="frozen", embeddings="frozen")
    apply_freezing(base, freeze)
    model = apply_lora(
        base, LoraSection(enabled=True, r=4, dropout=0.0, vision_targets=VISION_TARGETS), freeze
    )
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    vision = [n for n, _ in model.named_parameters() if ".vision." in n]
    assert {n for n in vision if n in trains} == {n for n in vision if "lora_" in n}
    for block in range(tiny_vlm.config.vision.layers):
        for target in VISION_TARGETS:
            assert f"base_model.model.vision.blocks.{block}.{target}.lora_A.default.weight" in trains
    assert not any("patch_embed" in n or "ln_" in n for n in trains if ".vision." in n)
    assert not [n for n in trains if ".llm." in n and "lora_" not in n]  # the LLM only through its adapters
    ids, pixels = image_inputs(tiny_vlm)
    model.train()
    model(ids, pixel_values=pixels, labels=ids).loss.backward()
    # lora_B starts at zero, so lora_A gets no gradient at first; lora_B does
    vision_b = [p.grad for n, p in model.named_parameters() if ".vision." in n and "lora_B" in n]
    assert vision_b and all(g is not None and g.abs().sum() > 0 for g in vision_b)  # gradient reaches the ViT
    with pytest.raises(ValueError, match="adapts a frozen vision tower"):
        apply_lora(
            copy.deepcopy(tiny_vlm),
            LoraSection(enabled=True, vision_targets=["attn.qkv"]),
            FreezeSection(vision="train", llm="frozen"),
        )


def test_vision_lora_save_load_merge_give_the_same_logits(tiny_vlm, tmp_path):
    base = copy.deepcopy(tiny_vlm)
    freeze = FreezeSection(vision="frozen", resampler="train", llm="frozen", embeddings="frozen")
    apply_freezing(base, freeze)
    reference_base = copy.deepcopy(base)
    model = apply_lora(
        base,
        LoraSection(
            enabled=True, r=4, alpha=8, dropout=0.0, targets=["q_proj"], vision_targets=VISION_TARGETS
        ),
        freeze,
    )
    _perturb_trainable(model)
    model.eval()
    ids, pixels = image_inputs(tiny_vlm, seed=1)
    want = model(ids, pixel_values=pixels).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("vision.blocks.1.mlp.fc2.lora_B" in k for k in saved)

    loaded = apply_adapter(copy.deepcopy(reference_base), tmp_path / "adapter", merge=False).eval()
    torch.testing.assert_close(loaded(ids, pixel_values=pixels).logits, want)
    merged = apply_adapter(copy.deepcopy(reference_base), tmp_path / "adapter", merge=True).eval()
    assert type(merged).__name__ == "VLM" and not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(merged(ids, pixel_values=pixels).logits, want, rtol=1e-4, atol=1e-4)
    # merging folded the vision adapters into the ViT's own weights
    assert not torch.allclose(
        merged.vision.blocks[0].attn.qkv.weight, reference_base.vision.blocks[0].attn.qkv.weight
    )


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


# ---- the fused LoRA forward (perf.fused_lora) against peft's own ----------------------------------------
class _TwoProjections(torch.nn.Module):
    def __init__(self, dim: int = 48):
        super().__init__()
        self.q_proj, self.up_proj = torch.nn.Linear(dim, dim, bias=False), torch.nn.Linear(dim, 2 * dim)

    def forward(self, x):
        return self.up_proj(torch.tanh(self.q_proj(x)))


def _peft_and_fused(dropout: float, dtype=torch.float32, device="cpu"):
    from peft import LoraConfig, get_peft_model

    from train.lora import fuse_lora_forwards

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "up_proj"])
    peft_model = get_peft_model(_TwoProjections(), config)
    _perturb_trainable(peft_model)
    for p in peft_model.parameters():  # frozen base in the storage dtype, adapters in fp32
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    peft_model.to(device)
    fused = copy.deepcopy(peft_model)
    assert fuse_lora_forwards(fused) == 2 and fuse_lora_forwards(fused) == 0  # installed once
    return peft_model, fused


def _run(model, x, seed: int, autocast: bool):
    torch.manual_seed(seed)
    model.zero_grad()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    (out.float() ** 2).mean().backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_fused_lora_forward_gives_peft_outputs_and_gradients(dropout):
    """fp32: the same dropout mask (same seed), the same outputs and adapter gradients as peft's forward."""
    peft_model, fused = _peft_and_fused(dropout)
    x = torch.randn(3, 5, 48, requires_grad=True)
    want, want_grads = _run(peft_model, x, seed=1, autocast=False)
    want_x = x.grad.clone()
    x.grad = None
    got, got_grads = _run(fused, x, seed=1, autocast=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, want_x, rtol=1e-5, atol=1e-6)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) == 4
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6)


def test_fused_lora_forward_under_bf16_autocast_matches_peft_within_bf16():
    """The trainer's setting: frozen bf16 base, fp32 adapters, bf16 autocast
    (CPU here, CUDA in the trainer)."""
    peft_model, fused = _peft_and_fused(0.0, dtype=torch.bfloat16)
    x = torch.randn(4, 7, 48)
    want, want_grads = _run(peft_model, x, seed=1, autocast=True)
    got, got_grads = _run(fused, x, seed=1, autocast=True)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    for name in want_grads:
        assert got_grads[name].dtype == torch.float32
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=5e-2, atol=1e-3)


def test_fused_lora_forward_leaves_disabled_and_merged_adapters_to_peft():
    peft_model, fused = _peft_and_fused(0.0)
    x = torch.randn(2, 3, 48)
    with torch.no_grad():
        with fused.disable_adapter(), peft_model.disable_adapter():  # the DPO reference: the base model
            torch.testing.assert_close(fused(x), peft_model(x))
        base = fused.get_base_model()
        torch.testing.assert_close(fused(x), peft_model(x), rtol=1e-5, atol=1e-6)
        base.q_proj.merge()
        base.up_proj.merge()
        torch.testing.assert_close(fused(x), peft_model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bitsandbytes 4-bit layers)")
def test_fused_lora_forward_on_4bit_layers_matches_peft():
    """Q-LoRA: the adapter's product added in place to the 4-bit layer's output (peft clones it first)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from train.lora import fuse_lora_forwards

    torch.manual_seed(0)
    model = _TwoProjections(64)
    for name in ("q_proj", "up_proj"):
        dense = getattr(model, name)
        q = bnb.nn.Linear4bit(
            dense.in_features,
            dense.out_features,
            bias=dense.bias is not None,
            compute_dtype=torch.bfloat16,
            quant_type="nf4",
        )
        q.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4")
        if dense.bias is not None:
            q.bias = torch.nn.Parameter(dense.bias.data, requires_grad=False)
        setattr(model, name, q)
    model = model.cuda()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    _perturb_trainable(peft_model)
    fused = copy.deepcopy(peft_model)
    assert fuse_lora_forwards(fused) == 2
    x = torch.randn(3, 5, 64, device="cuda")
    want, want_grads = _run(peft_model, x, seed=1, autocast=True)
    got, got_grads = _run(fused, x, seed=1, autocast=True)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=5e-2, atol=1e-3)


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )


def test_a_run_without_lora_does_not_import_peft():
    """The perf switches look for LoRA layers in every run; without peft loaded there are none, and peft
    (with bitsandbytes behind it) is not imported just to find that out."""
    run = _python(
        "import sys, torch\nfrom train.lora import fuse_lora_forwards\n"
        "assert fuse_lora_forwards(torch.nn.Sequential(torch.nn.Linear(2, 2))) == 0\n"
        "print('peft' in sys.modules, 'bitsandbytes' in sys.modules)"
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "False"]


BNB_CPU_WARNING = "Failed to load CPU gemm_4bit_forward"


def test_importing_peft_does_not_print_bitsandbytes_cpu_kernel_warning():
    """On an AVX512-bf16 CPU, a plain `import peft` makes bitsandbytes ask the Hub for a remote CPU
    kernel and warn, suggesting trust_remote_code; every peft import of ours goes through import_peft."""
    if BNB_CPU_WARNING not in _python("import peft").stderr:
        pytest.skip("a plain import of peft prints no such warning on this CPU / bitsandbytes version")
    ours = _python("from models.loading import import_peft\nimport_peft()\nimport peft")
    assert ours.returncode == 0, ours.stderr
    assert BNB_CPU_WARNING not in ours.stderr
