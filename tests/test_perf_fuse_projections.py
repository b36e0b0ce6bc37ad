"""perf.fuse_frozen_projections (models/fused_projections.py): q/k/v and gate/up of each decoder layer as one
product each. The loss and every trainable gradient equal the unfused model's (LoRA on q/k/v/o/gate/up, with
and without checkpointing and the fused LoRA forward); the saved state, the adapter files and the merged
export are those of the unfused model; the weights are not copied; where it cannot apply, one error."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from safetensors.torch import load_file

from models.errors import UserError
from models.fused_projections import ATTENTION_PROJECTIONS, MLP_PROJECTIONS
from train.freeze import apply_freezing
from train.lora import apply_lora
from train.perf import apply_perf_switches, fusion_unavailable, resolve_perf
from train.recipe import FreezeSection, LoraSection, PerfSection

FREEZE = FreezeSection(vision="frozen", resampler="train", llm="frozen", embeddings="frozen")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]


def lora_model(tiny_vlm, checkpointing: bool, dropout: float = 0.05):
    """The trainer's order (train.assemble): freeze, checkpointing, LoRA; adapters moved off zero."""
    vlm = copy.deepcopy(tiny_vlm).train()
    apply_freezing(vlm, FREEZE)
    if checkpointing:
        vlm.set_gradient_checkpointing(True)
    lora = LoraSection(enabled=True, r=4, alpha=8, dropout=dropout, targets=TARGETS)
    model = apply_lora(vlm, lora, FREEZE, gradient_checkpointing=checkpointing)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # LoRA B starts at zero: move it so the adapters' products count
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def with_perf(model, fuse: bool, fused_lora: bool = True):
    model = copy.deepcopy(model)
    perf = PerfSection(liger_kernels=False, fused_lora=fused_lora, fuse_frozen_projections=fuse)
    apply_perf_switches(model.get_base_model(), perf)
    return model


def loss_and_grads(model, seed: int = 0, forward_calls: torch.overrides.TorchFunctionMode | None = None):
    ids = torch.randint(10, 60, (2, 12), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)  # the adapters' dropout masks
    with forward_calls or contextlib.nullcontext():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


class LinearCalls(torch.overrides.TorchFunctionMode):
    """Records the weights F.linear is called with, as (data pointer, shape)."""

    def __init__(self):
        super().__init__()
        self.weights: list[tuple[int, tuple[int, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear:
            self.weights.append((args[1].data_ptr(), tuple(args[1].shape)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("fused_lora", [False, True])
def test_fused_projections_give_the_unfused_loss_and_gradients(tiny_vlm, checkpointing, fused_lora):
    model = lora_model(tiny_vlm, checkpointing)
    plain = with_perf(model, fuse=False, fused_lora=fused_lora)
    fused = with_perf(model, fuse=True, fused_lora=fused_lora)
    want_loss, want = loss_and_grads(plain)
    calls = LinearCalls()
    loss, grads = loss_and_grads(fused, forward_calls=calls)

    # The forward: one product per layer for q/k/v and one for gate/up, none of the separate ones.
    for layer in fused.get_base_model().llm.model.layers:
        for owner, names in ((layer.self_attn, ATTENTION_PROJECTIONS), (layer.mlp, MLP_PROJECTIONS)):
            group = owner._vlrecipe_fused_group.weight
            assert calls.weights.count((group.data_ptr(), tuple(group.shape))) == 1
            for name in names:
                weight = getattr(owner, name).base_layer.weight
                assert (weight.data_ptr(), tuple(weight.shape)) not in calls.weights
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == want.keys() and any("lora_B" in n and "v_proj" in n for n in grads)
    for name in want:
        torch.testing.assert_close(grads[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_adapters_switched_off_give_the_base_model(tiny_vlm):
    """DPO's reference pass: the fused product without the adapters' slices."""
    model = lora_model(tiny_vlm, checkpointing=False, dropout=0.0)
    plain, fused = with_perf(model, fuse=False), with_perf(model, fuse=True)
    ids = torch.randint(10, 60, (1, 9), generator=torch.Generator().manual_seed(3))
    with plain.disable_adapter(), fused.disable_adapter(), torch.no_grad():
        want, got = plain(input_ids=ids).logits, fused(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(fused(input_ids=ids).logits, got)


def test_projection_weights_are_views_of_the_fused_matrix_and_nothing_is_copied(tiny_vlm):
    model = lora_model(tiny_vlm, checkpointing=False)
    fused = with_perf(model, fuse=True)

    def stored_bytes(m) -> int:
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in m.parameters()}
        return sum(storages.values())

    assert stored_bytes(fused) == stored_bytes(model)
    attention = fused.get_base_model().llm.model.layers[0].self_attn
    group = attention._vlrecipe_fused_group
    for name in ATTENTION_PROJECTIONS:
        weight = getattr(attention, name).base_layer.weight
        assert weight.untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr()


def test_state_dict_adapter_files_and_merged_export_are_those_of_the_unfused_model(tiny_vlm, tmp_path):
    model = lora_model(tiny_vlm, checkpointing=False, dropout=0.0)
    plain, fused = with_perf(model, fuse=False), with_perf(model, fuse=True)
    want, got = plain.state_dict(), fused.state_dict()
    assert list(got) == list(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)

    for name, m in (("plain", plain), ("fused", fused)):
        m.save_pretrained(tmp_path / name / "adapter")
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "fused/adapter" / file).read_bytes() == (
            tmp_path / "plain/adapter" / file
        ).read_bytes()

    ids = torch.randint(10, 60, (1, 9), generator=torch.Generator().manual_seed(4))
    merged = {}
    for name, m in (("plain", plain), ("fused", fused)):
        vlm = m.merge_and_unload().eval()
        vlm.save_pretrained(tmp_path / name / "merged")  # on the CPU: the views saved as tensors of their own
        with torch.no_grad():
            merged[name] = vlm(input_ids=ids).logits
    torch.testing.assert_close(merged["fused"], merged["plain"], rtol=1e-5, atol=1e-6)
    saved = {n: load_file(tmp_path / n / "merged" / "model.safetensors") for n in ("plain", "fused")}
    assert saved["fused"].keys() == saved["plain"].keys()
    for key in saved["plain"]:
        torch.testing.assert_close(saved["fused"][key], saved["plain"][key], rtol=0, atol=0, msg=key)


def test_auto_resolves_to_off_with_a_note(tiny_vlm):
    perf, notes = resolve_perf(
        PerfSection(liger_kernels=False, fuse_frozen_projections="auto"),
        tiny_vlm,
        cuda=False,
        quantized=False,
    )
    assert perf.fuse_frozen_projections is False
    assert any(note.startswith("perf.fuse_frozen_projections: auto -> off") for note in notes)


@pytest.mark.parametrize(
    "where, message", [({"quantized": True}, "bitsandbytes 4-bit"), ({"zero3": True}, "ZeRO-3")]
)
def test_refused_where_the_projections_cannot_be_one_product(tiny_vlm, where, message):
    perf = PerfSection(liger_kernels=False, fuse_frozen_projections=True)
    with pytest.raises(UserError, match=f"perf.fuse_frozen_projections: .*{message}"):
        resolve_perf(perf, tiny_vlm, cuda=False, **{"quantized": False, **where})


def test_fp8_and_fusion_exclude_each_other():
    # resolve_perf turns perf.fp8 off on a CPU, so the FP8 card's case is asked of the check itself.
    assert "perf.fp8" in fusion_unavailable(quantized=False, zero3=False, fp8=True)
    assert fusion_unavailable(quantized=False, zero3=False, fp8=False) == ""


def test_refused_for_trainable_projections(tiny_vlm):
    vlm = copy.deepcopy(tiny_vlm).train()
    apply_freezing(vlm, FreezeSection(vision="frozen", resampler="train", llm="train", embeddings="train"))
    with pytest.raises(UserError, match=r"layers\.0\.self_attn\.q_proj trains"):
        apply_perf_switches(vlm, PerfSection(liger_kernels=False, fuse_frozen_projections=True))
