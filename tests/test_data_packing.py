"""data.packing / data.collate / data.sample: packing contract, dynamic padding, span-safe truncation."""

import torch

from data import stats
from data.collate import Collator
from data.packing import pack, pad, plan_rows
from data.sample import IGNORE_INDEX, TokenizedSample, truncate_span_safe

PAD = 0
S = 8  # image size in these tests


def make_sample(n, first_token, n_images=0):
    ids = torch.arange(first_token, first_token + n)
    labels = ids.clone()
    labels[0] = IGNORE_INDEX
    return {
        "input_ids": ids,
        "labels": labels,
        "pixel_values": torch.full((n_images, 3, S, S), float(first_token)),
        "truncated": False,
    }


def test_rows_fill_in_order_and_close_when_the_next_sample_would_overflow():
    assert plan_rows([4, 3, 2, 6, 1], max_len=8) == [[0, 1], [2, 3], [4]]
    assert plan_rows([8, 8], max_len=8) == [[0], [1]]


def test_packed_positions_restart_per_sample_and_tokens_are_accounted_exactly():
    samples = [
        make_sample(4, 100),
        make_sample(3, 200),
        make_sample(5, 300),
        make_sample(1, 400),
        make_sample(3, 500),
    ]
    batch = pack(samples, max_len=8, pad_id=PAD)
    # rows: [s0 s1], [s2 s3], [s4 pad pad pad pad]; width = longest row (7)
    assert batch["input_ids"].shape == (3, 7)
    assert batch["position_ids"].tolist() == [
        [0, 1, 2, 3, 0, 1, 2],
        [0, 1, 2, 3, 4, 0, 0],
        [0, 1, 2, 0, 1, 2, 3],
    ]
    assert batch["input_ids"][0].tolist() == [100, 101, 102, 103, 200, 201, 202]
    # exact accounting: every real token exactly once, padding is pad_id, supervised labels preserved
    real = batch["input_ids"][batch["input_ids"] != PAD]
    assert sorted(real.tolist()) == sorted(torch.cat([s["input_ids"] for s in samples]).tolist())
    assert (batch["labels"] != IGNORE_INDEX).sum() == sum(
        (s["labels"] != IGNORE_INDEX).sum() for s in samples
    )
    # the trailing padding is its own segment with labels -100
    assert batch["input_ids"][2, 3:].tolist() == [PAD] * 4
    assert batch["labels"][2, 3:].tolist() == [IGNORE_INDEX] * 4


def test_no_label_crosses_a_sample_boundary_in_a_packed_row():
    batch = pack([make_sample(3, 10), make_sample(3, 20)], max_len=8, pad_id=PAD)
    starts = batch["position_ids"] == 0
    assert (batch["labels"][starts] == IGNORE_INDEX).all()  # every segment's first label is ignored


def test_dynamic_padding_pads_right_to_the_longest_with_an_attention_mask():
    batch = pad([make_sample(2, 10), make_sample(4, 20)], pad_id=PAD)
    assert batch["input_ids"].tolist() == [[10, 11, PAD, PAD], [20, 21, 22, 23]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"][0, 2:].tolist() == [IGNORE_INDEX, IGNORE_INDEX]


def test_collator_concatenates_pixels_in_order_of_appearance_and_counts_drops():
    items = [
        make_sample(3, 1, n_images=2),
        {"dropped": stats.DROPPED_TOO_LONG},
        make_sample(3, 2, n_images=0),
        make_sample(2, 3, n_images=1),
    ]
    for packing in (False, True):
        batch = Collator(pad_id=PAD, image_size=S, row_len=8, packing=packing)(items)
        assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 1.0, 3.0]
        assert batch["num_samples"] == 3
        assert batch["_stats"][stats.DROPPED_TOO_LONG] == 1 and batch["_stats"][stats.SAMPLES] == 3
        assert ("attention_mask" in batch) == (not packing)


def test_collator_ships_the_flat_positions_of_every_predicted_label():
    """label_positions: where the loss needs logits (a label that is not -100 and has a token before it in
    its row), found in the worker so the training step never searches for them on the GPU."""
    items = [make_sample(3, 1, n_images=1), make_sample(4, 2), make_sample(2, 3)]
    for packing in (False, True):
        batch = Collator(pad_id=PAD, image_size=S, row_len=8, packing=packing)(items)
        labels = batch["labels"]
        expected = [
            r * labels.shape[1] + t
            for r in range(labels.shape[0])
            for t in range(1, labels.shape[1])
            if labels[r, t] != IGNORE_INDEX
        ]
        assert batch["label_positions"].tolist() == expected and expected


def test_a_longer_pack_len_shares_rows_and_cuts_padding(tmp_path):
    """Rows are padded to the longest row of the micro-batch; one row per micro-batch pads nothing."""
    from transformers import AutoTokenizer

    from data.dataset import DataConfig, build_dataloader
    from data.synthetic import generate

    world = tmp_path / "world"
    generate(world, seed=1, n_train=40, n_eval=4, image_size=28, vocab_size=600)
    tokenizer = AutoTokenizer.from_pretrained(world / "tokenizer")
    padding = {}
    for pack_len in (None, 4096):
        config = DataConfig(
            paths=[str(world / "sft.json")],
            image_size=28,
            max_len=256,
            packing=True,
            pack_len=pack_len,
            num_workers=0,
            shuffle=False,
        )
        batch = next(iter(build_dataloader(config, tokenizer, num_image_tokens=4, batch_size=16)))
        padding[pack_len] = batch["input_ids"].numel() - sum(batch["sample_lengths"])
        assert batch["num_samples"] == 16 and len(batch["sample_lengths"]) == 16
    assert padding[None] > 0 and padding[4096] == 0


def test_text_only_batch_has_an_empty_pixel_tensor():
    batch = Collator(pad_id=PAD, image_size=S, row_len=8)([make_sample(3, 1)])
    assert batch["pixel_values"].shape == (0, 3, S, S)


# ----------------------------------------------------------------------------------- truncation

IMG_S, IMG_E, IMG_P = 901, 902, 903


def image_sample():
    # text(3) + image span (<img> + 4 pads + </img> = 6) + text(3) + image span (6) + text(2) = 20 tokens
    span = [IMG_S] + [IMG_P] * 4 + [IMG_E]
    ids = [1, 2, 3] + span + [4, 5, 6] + span + [7, 8]
    labels = [IGNORE_INDEX, 2, 3] + [IGNORE_INDEX] * 6 + [4, 5, 6] + [IGNORE_INDEX] * 6 + [7, 8]
    return TokenizedSample(ids, labels, ["a.png", "b.png"])


def test_a_sample_that_fits_is_untouched():
    s = image_sample()
    assert truncate_span_safe(s, 20, IMG_S, IMG_E) is s


def test_truncation_between_spans_keeps_only_the_images_that_survive():
    out = truncate_span_safe(image_sample(), 12, IMG_S, IMG_E)
    assert out.input_ids == image_sample().input_ids[:12] and out.image_paths == ["a.png"]


def test_truncation_never_cuts_through_an_image_span():
    for max_len in range(4, 20):
        out = truncate_span_safe(image_sample(), max_len, IMG_S, IMG_E)
        assert out is not None
        assert len(out) <= max_len
        assert out.input_ids.count(IMG_S) == out.input_ids.count(IMG_E) == len(out.image_paths)
        assert out.input_ids.count(IMG_P) == 4 * len(out.image_paths)


def test_sample_with_nothing_supervised_left_is_dropped():
    s = TokenizedSample([1, IMG_S, IMG_P, IMG_P, IMG_E, 5], [IGNORE_INDEX] * 5 + [5], ["a.png"])
    assert truncate_span_safe(s, 4, IMG_S, IMG_E) is None


def test_bench_loader_reports_the_padding_that_pack_len_removes(capsys):
    from data import bench_loader

    argv = [
        "--workers",
        "0",
        "--batches",
        "2",
        "--batch-size",
        "8",
        "--image-size",
        "28",
        "--num-image-tokens",
        "4",
        "--packing",
        "--max-len",
        "256",
    ]
    bench_loader.main(argv)
    bench_loader.main([*argv, "--pack-len", "4096"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("workers=")]
    assert (
        len(rows) == 2 and "padding 0.0%" not in rows[0] and rows[1].endswith("padding 0.0% of token slots")
    )
