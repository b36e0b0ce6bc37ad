"""What one LoRA decoder layer keeps for its backward, by dtype: eager against inductor-compiled.

    PYTHONPATH=. python docs/experiments/compiled_layer_activations.py [--hidden 512] [--tokens 1024]

The question (issue 26: "keep the compiled layers' activations in bf16"): a layer that is not checkpointed
keeps its activations until its backward; are any of them fp32 that could be bf16? The layer is a Qwen2
decoder layer (the Qwen-VL-7B shape's and the families' layer type, at a small width) as the LoRA recipe
trains it: frozen bf16 weights, fp32 adapters on all seven projections, bf16 autocast, run by
models.decoder_layers (not checkpointed), on the CPU (inductor's CPU backend makes the same choice of what to
save: its partitioner runs before code generation). Every tensor saved for backward is counted once, by its
storage, except the weights; bytes per token of the layer's input.
"""

from __future__ import annotations

import argparse
import collections

import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

from models.decoder_layers import compile_layers, install_checkpointing

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class OneLayer(torch.nn.Module):
    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.layer = Qwen2DecoderLayer(config, 0)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.layer(x, **kwargs)


def saved_bytes(config: Qwen2Config, tokens: int, compiled: bool) -> dict[str, float]:
    torch.manual_seed(0)
    model = get_peft_model(OneLayer(config), LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS))
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.data = p.data.bfloat16()
    layer = model.base_model.model.layer.train()
    install_checkpointing(layer, False)
    if compiled:
        compile_layers([layer])
    rope = Qwen2RotaryEmbedding(config)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    positions = torch.arange(tokens)[None]

    def step() -> collections.Counter:
        counted, seen = collections.Counter(), set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                counted[str(t.dtype).removeprefix("torch.")] += storage.nbytes()
            return t

        x = torch.randn(1, tokens, config.hidden_size, requires_grad=True)
        with (
            torch.autocast("cpu", dtype=torch.bfloat16),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            cos_sin = rope(x, positions)
            out = layer(
                x.bfloat16(), position_embeddings=cos_sin, attention_mask=None, position_ids=positions
            )
        out.float().sum().backward()
        return counted

    step()  # compiles
    return {dtype: n / tokens for dtype, n in step().items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=1024)
    a = parser.parse_args()
    config = Qwen2Config(
        hidden_size=a.hidden,
        intermediate_size=a.hidden * 11008 // 4096,  # the Qwen-VL 7B shape's MLP ratio
        num_attention_heads=a.hidden // 64,
        num_key_value_heads=max(1, a.hidden // 256),
        num_hidden_layers=1,
        vocab_size=128,
    )
    config._attn_implementation = "sdpa"
    print(f"one Qwen2 decoder layer, hidden {a.hidden}, {a.tokens} tokens; bytes kept per token")
    print(f"{'layer':<10}{'bf16':>10}{'fp32':>10}{'total':>10}{'fp32 %':>9}")
    for compiled in (False, True):
        kept = saved_bytes(config, a.tokens, compiled)
        bf16, fp32 = kept.get("bfloat16", 0.0), kept.get("float32", 0.0)
        total = sum(kept.values())
        name = "compiled" if compiled else "eager"
        print(f"{name:<10}{bf16:>10,.0f}{fp32:>10,.0f}{total:>10,.0f}{100 * fp32 / total:>8.1f}%")


if __name__ == "__main__":
    main()
