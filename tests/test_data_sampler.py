"""data.sampler + the loader: deterministic order from (seed, epoch), sharded across ranks, resumable
mid-epoch through real multi-worker DataLoaders (2 ranks x 2 workers); micro-batches bounded by tokens
(train.micro_batch_tokens) keep all of that."""

import json
import re

import pytest
from PIL import Image

from data.dataset import DataConfig, build_dataloader
from data.sampler import ResumableSampler, TokenBatchSampler, token_batches

N_IMG = 2
N = 23  # not a multiple of world_size * batch_size, so the last round and batch are partial


def test_order_is_a_function_of_seed_and_epoch_and_ranks_partition_it():
    a, b = (
        ResumableSampler(N, seed=3, rank=0, world_size=2),
        ResumableSampler(N, seed=3, rank=1, world_size=2),
    )
    assert list(a) == list(ResumableSampler(N, seed=3, rank=0, world_size=2))
    assert list(a) != list(ResumableSampler(N, seed=4, rank=0, world_size=2))
    assert len(list(a)) == len(list(b)) == 12  # ceil(23 / 2), the head repeated once to even out ranks
    assert set(a) | set(b) == set(range(N))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first


def test_length_grouping_sorts_windows_by_length():
    lengths = [i % 7 for i in range(40)]
    s = ResumableSampler(40, seed=0, lengths=lengths, group_size=10)
    order = list(s)
    for w in range(0, 40, 10):
        window = [lengths[i] for i in order[w : w + 10]]
        assert window == sorted(window, reverse=True)
    assert sorted(order) == list(range(40))


def test_a_token_bounded_batch_closes_before_the_sample_that_would_overflow_it():
    lengths = [5, 3, 4, 9, 2, 2, 2, 12, 1]
    batches = list(token_batches(range(9), lengths, max_tokens=10, max_samples=100))
    assert batches == [[0, 1], [2], [3], [4, 5, 6], [7], [8]]  # 12 > 10 alone: a batch of its own
    assert [i for b in batches for i in b] == list(range(9))  # every sample once, in order


def test_micro_batch_caps_the_samples_of_a_token_bounded_batch():
    batches = list(token_batches(range(7), [1] * 7, max_tokens=100, max_samples=3))
    assert batches == [[0, 1, 2], [3, 4, 5], [6]]


def test_token_batches_follow_the_samplers_order_and_position():
    lengths = [(7 * i) % 11 + 1 for i in range(N)]
    sampler = ResumableSampler(N, seed=5, rank=1, world_size=2)
    batches = list(TokenBatchSampler(sampler, lengths, max_tokens=16, max_samples=8))
    assert [i for b in batches for i in b] == sampler.rank_indices(0)
    assert all(sum(lengths[i] for i in b) <= 16 for b in batches)
    assert len(TokenBatchSampler(sampler, lengths, 16, 8)) == len(batches)
    sampler.advance(len(batches[0]) + len(batches[1]))  # two batches delivered: the rest is the same batches
    assert list(TokenBatchSampler(sampler, lengths, max_tokens=16, max_samples=8)) == batches[2:]


def test_state_dict_refuses_a_different_world():
    s = ResumableSampler(N, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        ResumableSampler(N, world_size=4).load_state_dict(s.state_dict())


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    (root / "imgs").mkdir()
    for i in range(N):
        Image.new("RGB", (8, 8), (i * 10, 0, 0)).save(root / "imgs" / f"{i}.png")
    records = [
        {
            "conversations": [
                {"from": "user", "value": f"<img>imgs/{i}.png</img>q" + " more" * (i % 5)},
                {"from": "assistant", "value": f"n{i}"},
            ]
        }
        for i in range(N)
    ]
    (root / "train.json").write_text(json.dumps(records))
    return root / "train.json"


def sample_ids(batch, tok):
    return [int(m) for row in batch["input_ids"] for m in re.findall(r"assistant\nn(\d+)", tok.decode(row))]


BATCH_TOKENS = (
    125  # the samples below have 37-46 tokens: on each rank some batches of three fit, others close at two
)


def make_loader(path, tok, rank, batch_tokens=None):
    cfg = DataConfig(
        paths=[str(path)], image_size=8, max_len=64, num_workers=2, seed=11, packing=batch_tokens is not None
    )
    return build_dataloader(
        cfg, tok, num_image_tokens=N_IMG, batch_size=3, rank=rank, world_size=2, batch_tokens=batch_tokens
    )


def epoch_batches(loader, tok) -> list[list[int]]:
    return [sample_ids(b, tok) for b in loader]


def test_sample_lengths_counted_in_worker_processes_are_those_counted_in_order(
    data_file, tiny_tokenizer, monkeypatch
):
    import data.map_style

    monkeypatch.setattr(data.map_style, "LENGTHS_CHUNK", 5)  # 23 samples: 5 chunks over 2 workers
    dataset = make_loader(data_file, tiny_tokenizer, rank=0, batch_tokens=BATCH_TOKENS).dataloader.dataset
    in_order = dataset.token_lengths(num_workers=0)
    assert in_order == [dataset.token_length(i) for i in range(N)] and len(set(in_order)) > 1
    assert dataset.token_lengths(num_workers=2) == in_order


@pytest.mark.slow
@pytest.mark.parametrize("batch_tokens", [None, BATCH_TOKENS], ids=["samples", "tokens"])
def test_resumed_run_sees_exactly_the_samples_of_an_uninterrupted_run(
    data_file, tiny_tokenizer, batch_tokens
):
    tok = tiny_tokenizer
    for rank in (0, 1):
        # uninterrupted: two epochs
        loader = make_loader(data_file, tok, rank, batch_tokens)
        batches = []
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            batches.append(epoch_batches(loader, tok))
        expected = [[i for b in epoch for i in b] for epoch in batches]
        assert len(expected[0]) == 12 and expected[0] != expected[1]
        if batch_tokens is not None:  # the token bound, not the 3-sample cap, closes some batches
            assert {len(b) for b in batches[0]} >= {2, 3}
            lengths = loader.dataloader.dataset.token_lengths()
            assert all(sum(lengths[i] for i in b) <= batch_tokens for b in batches[0])
        assert expected[0] == [
            int(i) for i in ResumableSampler(N, seed=11, rank=rank, world_size=2).rank_indices(0)
        ]

        # interrupted after 2 batches (workers have prefetched more), resumed in a fresh loader
        loader = make_loader(data_file, tok, rank, batch_tokens)
        loader.set_epoch(0)
        seen = []
        for k, b in enumerate(loader):
            seen.append(sample_ids(b, tok))
            if k == 1:
                break
        state = json.loads(json.dumps(loader.state_dict()))  # survives a checkpoint round trip
        resumed = make_loader(data_file, tok, rank, batch_tokens)
        resumed.load_state_dict(state)
        assert len(resumed) == len(batches[0]) - 2
        seen += epoch_batches(resumed, tok)
        assert seen == batches[0]  # the same samples in the same batches
        # the epoch ended, so the loader moved on to epoch 1 by itself
        assert epoch_batches(resumed, tok) == batches[1]
    # across ranks the epoch covers every sample
    ranks = [ResumableSampler(N, seed=11, rank=r, world_size=2).rank_indices(0) for r in (0, 1)]
    assert set(ranks[0]) | set(ranks[1]) == set(range(N))
