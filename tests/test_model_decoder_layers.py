"""models.decoder_layers: a checkpointed Llama-family layer with a frozen down projection recomputes
everything but that projection; losses and gradients are those of the layer's own forward, for every
architecture listed, compiled or not, and generation (outside training) runs the layer's own forward."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch.utils.checkpoint import set_checkpoint_early_stop

from models.decoder_layers import (
    SPLIT_LAYER_TYPES,
    compile_layers,
    install_checkpointing,
    is_checkpointed,
    set_decoder_checkpointing,
)

CONFIGS = {  # each listed layer type, from its tiny config
    "LlamaDecoderLayer": "LlamaConfig",
    "MistralDecoderLayer": "MistralConfig",
    "Qwen2DecoderLayer": "Qwen2Config",
    "Qwen3DecoderLayer": "Qwen3Config",
    # The HF VLM families' decoders (models.families), built alone: their text models with M-RoPE tables.
    "Qwen2VLDecoderLayer": "Qwen2VLTextConfig",
    "Qwen2_5_VLDecoderLayer": "Qwen2_5_VLTextConfig",
    "Qwen3VLTextDecoderLayer": "Qwen3VLTextConfig",
}


class TextModelOnly(torch.nn.Module):
    """A family's text model where the tests reach a causal LM's decoder: ``.model``."""

    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        self.model = decoder


def tiny_lm(layer_type: str, trainable_down: bool = False):
    config_name = CONFIGS[layer_type]
    family = config_name.endswith("TextConfig")
    config = getattr(transformers, config_name)(
        hidden_size=32,
        intermediate_size=88,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        head_dim=8,
        # M-RoPE's (temporal, height, width) split of the head's 4 rotary frequencies
        **({"rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1]}} if family else {}),
    )
    torch.manual_seed(0)
    if family:
        model = TextModelOnly(getattr(transformers, config_name.replace("Config", "Model"))(config)).train()
    else:
        model = transformers.AutoModelForCausalLM.from_config(config).train()
    assert type(model.model.layers[0]).__name__ == layer_type
    for name, p in model.named_parameters():  # as under LoRA: a few trainable projections, the rest frozen
        p.requires_grad_(
            name.endswith(("q_proj.weight", "up_proj.weight")) or (trainable_down and "down_proj" in name)
        )
    return model


def loss_and_grads(model, ids):
    embeds = model.model.embed_tokens(ids).detach().requires_grad_()
    hidden = model.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    loss = hidden.float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["inputs_embeds"] = embeds.grad.clone()
    return loss.detach(), grads


def step_flops(model, ids) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss_and_grads(model, ids)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def test_every_listed_layer_type_is_tested():
    assert set(CONFIGS) == SPLIT_LAYER_TYPES


@pytest.mark.parametrize("layer_type", sorted(SPLIT_LAYER_TYPES))
@pytest.mark.parametrize("trainable_down", [False, True])
def test_checkpointed_layers_give_the_layers_own_loss_and_gradients(layer_type, trainable_down):
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    plain = tiny_lm(layer_type, trainable_down)
    expected = loss_and_grads(plain, ids)
    split = copy.deepcopy(plain)
    for layer in split.model.layers:
        assert install_checkpointing(layer, checkpointed=True) and is_checkpointed(layer)
    loss, grads = loss_and_grads(split, ids)
    torch.testing.assert_close(loss, expected[0])
    assert grads.keys() == expected[1].keys()
    for name, grad in expected[1].items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # Against transformers' whole-layer checkpointing: a frozen down projection is not recomputed (its
    # product, 2 x tokens x intermediate x hidden FLOPs per layer, is saved); a trainable one is. The
    # recompute runs to the layer's end here, as a compiled layer's does (its graph is one op: eager
    # checkpointing may stop early).
    split.zero_grad(set_to_none=True)
    whole = copy.deepcopy(plain)
    whole.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with set_checkpoint_early_stop(False):
        saved = step_flops(whole, ids) - step_flops(split, ids)
    assert saved == (0 if trainable_down else 3 * 2 * ids.numel() * 88 * 32)


def test_a_down_projection_that_would_keep_a_cast_copy_of_its_weight_stays_inside_the_checkpoint():
    """Under bf16 autocast an fp32 frozen weight is cast for every call and the cast copy is what the
    product's backward keeps: outside the checkpoint that is one weight-sized copy per layer (the plain
    anchor's fp32 frozen weights measured 2.7 GiB more on the H100). bf16 weights, or no autocast, keep
    nothing extra."""
    from models.decoder_layers import down_projection_keeps_nothing

    layer = tiny_lm("Qwen2DecoderLayer").model.layers[0]
    assert down_projection_keeps_nothing(layer, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not down_projection_keeps_nothing(layer, "cpu")
        layer.mlp.down_proj.to(torch.bfloat16)
        assert down_projection_keeps_nothing(layer, "cpu")
    layer.mlp.down_proj.weight.requires_grad_(True)
    assert not down_projection_keeps_nothing(layer, "cpu")


@pytest.mark.parametrize(
    "layer_type", ["Qwen2DecoderLayer", "Qwen2_5_VLDecoderLayer", "Qwen3VLTextDecoderLayer"]
)
def test_compiled_cores_under_the_checkpoint_keep_loss_and_gradients(layer_type):
    """The compiled part is called by the checkpoint (AOT autograd on the CPU, where the recompute's saved
    tensors are checked against the forward's), one graph for every layer."""
    torch._dynamo.reset()
    ids = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(2))
    plain = tiny_lm(layer_type)
    expected = loss_and_grads(plain, ids)
    split = copy.deepcopy(plain)
    for i, layer in enumerate(split.model.layers):
        install_checkpointing(layer, checkpointed=i != 1)  # layer 1 keeps its activations, compiled whole
    compile_layers(list(split.model.layers), backend="aot_eager")
    for _ in range(2):  # a second step: the compiled graphs are reused
        split.zero_grad(set_to_none=True)
        loss, grads = loss_and_grads(split, ids)
        torch.testing.assert_close(loss, expected[0], rtol=1e-5, atol=1e-6)
        for name, grad in expected[1].items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_outside_training_the_layer_runs_its_own_forward_with_the_kv_cache():
    plain = tiny_lm("Qwen2DecoderLayer").eval()
    split = copy.deepcopy(plain)
    for layer in split.model.layers:
        install_checkpointing(layer, checkpointed=True)
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(split.generate(ids, **kwargs), plain.generate(ids, **kwargs))


def test_other_architectures_are_left_to_transformers():
    class OtherLayer(torch.nn.Module):
        gradient_checkpointing = False

    assert not install_checkpointing(OtherLayer(), checkpointed=True)


@pytest.mark.parametrize("api", ["activation_checkpointing", "gradient_checkpointing"])
def test_checkpointing_is_switched_through_either_name_transformers_gives_it(api, monkeypatch):
    """transformers 5.25 names the switch activation_checkpointing_enable (and warns on the old name); 5.17,
    on the GPU machines, has only gradient_checkpointing_enable. Either name is called, non-reentrant; the
    chosen layers checkpoint, and switching off undoes it."""
    model = tiny_lm("Qwen2DecoderLayer")
    cls = type(model)
    calls = []
    if api == "gradient_checkpointing":  # the older release: only the old names, which this one forwards
        for name in ("activation_checkpointing_enable", "activation_checkpointing_disable"):
            monkeypatch.delattr(next(c for c in cls.__mro__ if name in vars(c)), name)
        monkeypatch.setattr(cls, "gradient_checkpointing_enable", lambda self, **kw: calls.append(("on", kw)))
        monkeypatch.setattr(cls, "gradient_checkpointing_disable", lambda self: calls.append(("off", {})))
    else:
        enable, disable = cls.activation_checkpointing_enable, cls.activation_checkpointing_disable
        monkeypatch.setattr(
            cls, f"{api}_enable", lambda self, **kw: calls.append(("on", kw)) or enable(self, **kw)
        )
        monkeypatch.setattr(cls, f"{api}_disable", lambda self: calls.append(("off", {})) or disable(self))
    set_decoder_checkpointing(model, True, llm_layers=2)
    assert [is_checkpointed(layer) for layer in model.model.layers] == [True, True, False]
    set_decoder_checkpointing(model, False)
    assert not any(is_checkpointed(layer) for layer in model.model.layers)
    assert calls == [("on", {f"{api}_kwargs": {"use_reentrant": False}}), ("off", {})]
