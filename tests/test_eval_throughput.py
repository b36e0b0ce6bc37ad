"""The throughput benchmark: a CPU smoke run on the tiny preset, the full-scale model on a GPU."""

import pytest
import torch

from eval_mm.bench_throughput import VARIANTS


def test_bench_throughput_smoke_on_tiny_preset_prints_every_variant(capsys):
    from eval_mm.bench_throughput import main

    out = main(
        [
            "--preset",
            "tiny",
            "--batch-size",
            "2",
            "--baseline-batch-size",
            "1",
            "--batches",
            "1",
            "--max-new-tokens",
            "2",
            "--prompt-tokens",
            "4",
        ]
    )
    assert list(out["variants"]) == list(VARIANTS)
    for variant, result in out["variants"].items():
        assert result["generate_samples_per_s"] > 0 and result["choice_samples_per_s"] > 0, variant
        assert result["warmup_s"] >= 0
    printed = capsys.readouterr().out
    assert all(f"\n{v} " in printed for v in VARIANTS)  # the table


def test_bench_throughput_variants_run_in_a_fixed_order_and_unknown_ones_are_refused():
    import argparse

    from eval_mm.bench_throughput import parse_variants

    assert parse_variants("fast,baseline") == ["baseline", "fast"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown variants"):
        parse_variants("fast,quick")


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the full-scale 7B model in bf16)"
)
def test_bench_throughput_reports_samples_per_second_and_memory_on_gpu():
    from eval_mm.bench_throughput import main

    out = main(["--batches", "1", "--max-new-tokens", "4"])
    for variant, result in out["variants"].items():
        assert result["generate_samples_per_s"] > 0 and result["choice_samples_per_s"] > 0, variant
        assert result["peak_memory_gib"] > 10, variant  # the 7B model itself is ~19 GiB in bf16
