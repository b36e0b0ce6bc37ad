"""Contiguous shards: every sample in exactly one shard, in order, sizes differing by at most one."""

import pytest

from eval_mm.sharding import shard_range


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("num_items", [0, 1, 2, 3, 5, 7, 8, 13])
def test_shards_cover_every_item_once(num_items, world_size):
    shards = [shard_range(num_items, rank, world_size) for rank in range(world_size)]
    assert [i for s in shards for i in s] == list(range(num_items))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first num_items % world ranks get the extra one


def test_reference_example():
    # 10 items over 4 ranks: 3, 3, 2, 2
    assert [list(shard_range(10, r, 4)) for r in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
