"""save_pretrained -> from_pretrained is bit-identical, sharded or not, tied or not."""

import json

import pytest
import torch

from models import build_vlm, load_tokenizer, load_vlm, presets


def outputs(model, tok):
    n = model.config.num_image_tokens
    ids = tok("Picture 1:", add_special_tokens=False)["input_ids"]
    ids = torch.tensor(
        [ids + [model.config.image_start_id] + [model.config.image_pad_id] * n + [model.config.image_end_id]]
    )
    px = torch.randn(1, 3, 84, 84, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids, pixel_values=px).logits


@pytest.mark.parametrize("max_shard_size", ["5GB", 200_000])
def test_round_trip_is_bit_identical(tmp_path, tiny_vlm, tiny_tokenizer, max_shard_size):
    tiny_vlm.save_pretrained(tmp_path, max_shard_size=max_shard_size)
    sharded = (tmp_path / "model.safetensors.index.json").is_file()
    assert sharded == (max_shard_size != "5GB")
    if sharded:
        assert (
            len(
                set(
                    json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values()
                )
            )
            > 1
        )
    loaded = load_vlm(tmp_path).eval()
    assert loaded.config == tiny_vlm.config
    for (k, a), (k2, b) in zip(tiny_vlm.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    assert torch.equal(outputs(loaded, tiny_tokenizer), outputs(tiny_vlm, tiny_tokenizer))
    assert loaded.tokenizer is not None and loaded.tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
    assert load_tokenizer(tmp_path)("<img></img>")["input_ids"] == tiny_tokenizer("<img></img>")["input_ids"]


def test_tied_embeddings_are_saved_once_and_retied(tmp_path, tiny_tokenizer):
    cfg = presets.tiny(len(tiny_tokenizer))
    cfg.text_config["tie_word_embeddings"] = True
    torch.manual_seed(0)
    model = build_vlm(cfg, tokenizer=tiny_tokenizer).eval()
    assert model.llm.get_output_embeddings().weight is model.llm.get_input_embeddings().weight
    model.save_pretrained(tmp_path)
    loaded = load_vlm(tmp_path).eval()
    assert loaded.llm.get_output_embeddings().weight is loaded.llm.get_input_embeddings().weight
    assert torch.equal(outputs(loaded, tiny_tokenizer), outputs(model, tiny_tokenizer))


def test_load_in_bfloat16(tmp_path, tiny_vlm):
    tiny_vlm.save_pretrained(tmp_path)
    loaded = load_vlm(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(loaded.resampler.query, tiny_vlm.resampler.query.to(torch.bfloat16))


def test_explicit_state_dict_is_what_gets_saved(tmp_path, tiny_vlm):
    sd = {k: v.clone() for k, v in tiny_vlm.state_dict().items()}
    sd["resampler.query"].fill_(0.5)
    tiny_vlm.save_pretrained(tmp_path, state_dict=sd)
    assert torch.all(load_vlm(tmp_path).resampler.query == 0.5)


def test_missing_weights_are_a_clear_error(tmp_path, tiny_vlm):
    tiny_vlm.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_vlm(tmp_path)


def test_a_saved_vlm_tokenizes_exactly_like_the_tokenizer_it_was_trained_with(
    tmp_path, tiny_vlm, tiny_tokenizer
):
    """load_tokenizer must read the saved tokenizer.json, not rebuild the LLM family's tokenizer class
    (a Qwen2Tokenizer with Qwen2's pre-tokenizer split ' 1' into ' ' + '1' and added NFC)."""
    import copy

    from models import load_tokenizer

    model = copy.deepcopy(tiny_vlm)
    model.tokenizer = tiny_tokenizer
    model.save_pretrained(tmp_path / "vlm")
    loaded = load_tokenizer(tmp_path / "vlm")
    texts = [
        " 1",
        "a 1 photo of 2 dogs",
        "Café",
        "<img>a.png</img><|im_start|>user\nhi<|im_end|>",
        "x  y\n\nz",
    ]
    for text in texts:
        assert loaded(text)["input_ids"] == tiny_tokenizer(text)["input_ids"], text
