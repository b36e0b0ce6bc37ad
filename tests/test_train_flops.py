"""train.flops: the model-FLOP convention behind the training loop's MFU and train.bench, checked
against hand counts."""

from models import presets
from train.flops import step_flops


def test_qwen_vl_decoder_counts_its_linears_and_lm_head_not_the_embedding_lookup():
    config = presets.qwen_vl_7b(vocab_size=151936)
    trained = step_flops(config, vision_trains=False, resampler_trains=True, llm_trains=True)
    d, ffn, layers = 4096, 11008, 32
    n_linear = layers * (4 * d * d + 3 * d * ffn) + d * 151936  # q,k,v,o + gate,up,down; LM head
    assert n_linear == 7_098_335_232
    assert trained.per_token == 6 * n_linear
    frozen = step_flops(config, vision_trains=False, resampler_trains=True, llm_trains=False)
    assert frozen.per_token == 4 * n_linear  # gradient still flows through a frozen decoder


def test_lora_adapters_cost_six_flops_per_parameter_per_token():
    config = presets.tiny(vocab_size=700)
    plain = step_flops(config, vision_trains=False, resampler_trains=False, llm_trains=False)
    lora = step_flops(config, vision_trains=False, resampler_trains=False, llm_trains=False, lora_params=1000)
    assert lora.per_token - plain.per_token == 6000


def test_a_frozen_vision_tower_runs_forward_only_and_per_image():
    config = presets.qwen_vl_7b()
    frozen = step_flops(config, vision_trains=False, resampler_trains=True, llm_trains=True)
    trains = step_flops(config, vision_trains=True, resampler_trains=True, llm_trains=True)
    patches, width, layers, mlp = 32 * 32, 1664, 48, 8192
    vit_forward = layers * (2 * patches * (4 * width**2 + 2 * width * mlp) + 4 * patches**2 * width)
    vit_forward += 2 * patches * 3 * 14 * 14 * width  # patch embedding
    assert trains.per_image - frozen.per_image == 2 * vit_forward
    assert 3.7e12 < vit_forward < 4.2e12  # ~2 x 1.84B parameters x 1,024 patches, plus attention


def test_a_step_adds_tokens_attention_and_images():
    config = presets.tiny(vocab_size=700)
    rates = step_flops(config, vision_trains=True, resampler_trains=True, llm_trains=True)
    d, layers = config.text_config["hidden_size"], config.text_config["num_hidden_layers"]
    assert (
        rates.per_attention_pair == 3 * 2 * d * layers
    )  # causal: 2 s^2 d per layer forward, x3 with backward
    expected = rates.per_token * 80 + rates.per_attention_pair * (30**2 + 50**2) + rates.per_image * 2
    assert rates(80, 2, 30**2 + 50**2) == expected
