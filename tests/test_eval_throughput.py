"""The throughput benchmark: a CPU smoke run on the tiny preset, the full-scale model on a GPU."""

import pytest
import torch


def test_bench_throughput_smoke_on_tiny_preset():
    from eval_mm.bench_throughput import main

    out = main(["--preset", "tiny", "--batch-size", "2", "--batches", "1", "--max-new-tokens", "3",
                "--prompt-tokens", "4"])
    assert out["generate_samples_per_s"] > 0 and out["choice_samples_per_s"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_throughput_reports_samples_per_second():
    from eval_mm.bench_throughput import main

    out = main(["--batch-size", "2", "--batches", "1", "--max-new-tokens", "4"])
    assert out["generate_samples_per_s"] > 0 and out["choice_samples_per_s"] > 0
