"""The trainer's fast path computes the losses of the plain path (train.bench's anchor) on the same data:
packing with the collator's sample boundaries, the fused (chunked) cross-entropy, micro-batches split into
forwards of whole rows, no image-span check. CPU, fp32: equal to float tolerance. (GPU-only switches —
varlen, liger, compile — are pinned against the plain path in tests/test_perf_equivalence.py and
tests/test_perf_compile.py.)"""

from __future__ import annotations

import pytest
from test_train_world import TINY, make_world, read_losses, run_train, world_overrides

from train.bench import PLAIN


@pytest.mark.slow
def test_recipe_switches_keep_the_plain_paths_losses(tmp_path):
    world = make_world(tmp_path / "world")
    common = ["model.preset=tiny", "train.steps=4", "train.micro_batch=4", "log.every=1", "data.max_len=128"]
    fast = [
        "data.packing=true",
        "data.pack_len=128",
        "train.max_forward_tokens=128",
        "perf.loss_impl=chunked",
        "perf.check_image_spans=false",
    ]
    run_train(
        [str(TINY / "sft.yaml"), *world_overrides(world, tmp_path / "plain", "chat.json"), *common, *PLAIN]
    )
    run_train(
        [str(TINY / "sft.yaml"), *world_overrides(world, tmp_path / "fast", "chat.json"), *common, *fast]
    )
    plain, fast = read_losses(tmp_path / "plain"), read_losses(tmp_path / "fast")
    assert plain.keys() == fast.keys() == {1, 2, 3, 4}
    for step in plain:
        assert fast[step] == pytest.approx(plain[step], rel=1e-4), f"step {step}"
