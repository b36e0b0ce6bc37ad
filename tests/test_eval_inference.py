"""The fast eval paths give the old path's answers: multiple choice scored from one prompt encoding equals
one full row per option, a static KV cache generates the same tokens as the dynamic one, and neither
depends on how samples are batched (tiny model, float32, CPU)."""

import dataclasses

import pytest
import torch

from eval_mm.benchmarks import get_benchmark
from eval_mm.datasets import load_samples
from eval_mm.inference import (
    BatchBuilder,
    StaticCacheSlot,
    generate_answers,
    rank_options,
    rank_options_per_row,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from data.synthetic import generate

    root = tmp_path_factory.mktemp("eval_data")
    generate(root / "synthetic", seed=0, n_train=4, n_eval=6, image_size=56, vocab_size=300)
    return root


def build(tiny_vlm, tiny_tokenizer, bench, prompt_format, samples):
    config = tiny_vlm.config
    builder = BatchBuilder(
        tiny_tokenizer, bench, prompt_format, config.num_image_tokens, config.vision.image_size
    )
    return builder(samples)


def choice_samples(data_root):
    """The synthetic multiple-choice prompts with 4, 2, 3, 4, 5, 4 options: rows with fewer options than
    the longest sample must score the same as alone."""
    samples = load_samples(get_benchmark("synth_mc"), data_root)
    counts = [4, 2, 3, 4, 5, 4]
    return [dataclasses.replace(s, options=tuple("ABCDE"[:n])) for s, n in zip(samples, counts, strict=True)]


@pytest.mark.parametrize("prompt_format", ["raw", "chatml"])
def test_options_scored_from_one_prompt_encoding_equal_one_row_per_option(
    tiny_vlm, tiny_tokenizer, data_root, prompt_format
):
    bench = get_benchmark("synth_mc")
    samples = choice_samples(data_root)
    batch = build(tiny_vlm, tiny_tokenizer, bench, prompt_format, samples)
    lengths = {len(ids) for options in batch.option_ids for ids in options}
    # The tiny tokenizer makes " D" two tokens after a raw prompt: the KV-cache continuation is exercised.
    assert lengths == ({1, 2} if prompt_format == "raw" else {1})

    fast = rank_options(tiny_vlm, batch, CPU)
    per_row = rank_options_per_row(tiny_vlm, batch, CPU)
    for sample, (letter, losses), (ref_letter, ref_losses) in zip(samples, fast, per_row, strict=True):
        assert len(losses) == len(sample.options)
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        assert letter == ref_letter


def test_option_losses_do_not_depend_on_the_batch(tiny_vlm, tiny_tokenizer, data_root):
    bench = get_benchmark("synth_mc")
    samples = choice_samples(data_root)
    together = rank_options(tiny_vlm, build(tiny_vlm, tiny_tokenizer, bench, "raw", samples), CPU)
    for size in (1, 4):
        alone = []
        for start in range(0, len(samples), size):
            alone += rank_options(
                tiny_vlm, build(tiny_vlm, tiny_tokenizer, bench, "raw", samples[start : start + size]), CPU
            )
        for (letter, losses), (ref_letter, ref_losses) in zip(alone, together, strict=True):
            assert letter == ref_letter and losses == pytest.approx(ref_losses, rel=1e-5)


@pytest.mark.parametrize("prompt_format", ["raw", "chatml"])
def test_static_cache_generates_what_the_dynamic_cache_does_in_any_batch(
    tiny_vlm, tiny_tokenizer, data_root, prompt_format
):
    bench = get_benchmark("synth_vqa")
    samples = load_samples(bench, data_root)
    dynamic = generate_answers(
        tiny_vlm,
        tiny_tokenizer,
        build(tiny_vlm, tiny_tokenizer, bench, prompt_format, samples),
        bench,
        prompt_format,
        CPU,
    )
    assert any(dynamic)
    # One cache for the whole run, as the runner keeps it: batches of 4 then 2 (2 dummy rows), and a longer
    # batch than the first (the cache is remade).
    slot = StaticCacheSlot(tiny_vlm.llm.config, rows=4)
    static = []
    for part in (samples[:4], samples[4:]):
        batch = build(tiny_vlm, tiny_tokenizer, bench, prompt_format, part)
        static += generate_answers(
            tiny_vlm, tiny_tokenizer, batch, bench, prompt_format, CPU, static_cache=slot
        )
    assert static == dynamic
    first = slot.cache
    longer = build(tiny_vlm, tiny_tokenizer, bench, prompt_format, samples[:1])
    longer.input_ids = torch.cat(
        [longer.input_ids.new_full((1, slot.length), longer.pad_id), longer.input_ids], 1
    )
    longer.attention_mask = torch.cat(
        [longer.attention_mask.new_zeros((1, slot.length)), longer.attention_mask], 1
    )
    assert (
        generate_answers(tiny_vlm, tiny_tokenizer, longer, bench, prompt_format, CPU, static_cache=slot)
        == dynamic[:1]
    )
    assert slot.cache is not first and slot.length % StaticCacheSlot.LENGTH_STEP == 0


def test_static_cache_refuses_a_batch_larger_than_its_rows(tiny_vlm, tiny_tokenizer, data_root):
    bench = get_benchmark("synth_vqa")
    batch = build(tiny_vlm, tiny_tokenizer, bench, "raw", load_samples(bench, data_root)[:3])
    with pytest.raises(ValueError, match="batch of 3 rows > the static cache's 2"):
        generate_answers(
            tiny_vlm,
            tiny_tokenizer,
            batch,
            bench,
            "raw",
            CPU,
            static_cache=StaticCacheSlot(tiny_vlm.llm.config, rows=2),
        )


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="transformers compiles the decode step on CUDA only"
)
def test_compiled_decoding_on_cuda_generates_what_eager_decoding_does(tiny_vlm, tiny_tokenizer, data_root):
    import copy

    model = copy.deepcopy(tiny_vlm).cuda()
    model.compile_blocks(vision=True)
    bench = get_benchmark("synth_vqa")
    batch = build(model, tiny_tokenizer, bench, "raw", load_samples(bench, data_root))
    device = torch.device("cuda")
    eager = generate_answers(model, tiny_tokenizer, batch, bench, "raw", device)
    slot = StaticCacheSlot(model.llm.config, rows=len(batch.samples))
    compiled = [
        generate_answers(model, tiny_tokenizer, batch, bench, "raw", device, static_cache=slot)
        for _ in range(3)
    ]
    assert hasattr(model.llm, "_compiled_call"), "transformers did not compile the decode step"
    assert compiled == [eager] * 3
