"""Bad image files: missing ones are found when the data is loaded (before any model is built), undecodable
ones when a worker first reads them, and data.max_bad_images counts distinct files, not occurrences."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from data import stats
from data.dataset import DataConfig, build_dataloader, find_missing_images, load_data
from data.image_files import ImageLoadError

N_IMG = 4


def write_chat_data(folder, n: int, missing: set[int] = frozenset(), corrupt: set[int] = frozenset()):
    """n chat records, record i showing imgs/i.png; the `missing` files are never written, the `corrupt`
    ones are not images."""
    for i in range(n):
        path = folder / "imgs" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if i in corrupt:
            path.write_bytes(b"not an image")
        elif i not in missing:
            Image.new("RGB", (20, 10), (i * 20, 0, 0)).save(path)
    records = [
        {
            "conversations": [
                {"from": "user", "value": f"<img>imgs/{i}.png</img>what is {i}?"},
                {"from": "assistant", "value": f"it is {i}"},
            ]
        }
        for i in range(n)
    ]
    (folder / "train.json").write_text(json.dumps(records))
    return folder / "train.json"


def config(path, **kw) -> DataConfig:
    return DataConfig(**{"paths": [str(path)], "image_size": 16, "max_len": 256, "num_workers": 0, **kw})


def test_missing_images_beyond_the_limit_fail_at_load_with_one_summary(tmp_path):
    path = write_chat_data(tmp_path, 30, missing={3, 7, 11, 12, 20, 21, 29})
    with pytest.raises(ImageLoadError) as err:
        load_data(config(path, max_bad_images=6))
    message = str(err.value)
    assert "7 image files are missing, used by 7 of the 30 records of" in message
    # a sample of the files, each with the first record that uses it, then the limit that was exceeded
    assert f"{tmp_path / 'imgs' / '3.png'} ({path} record 3)" in message
    assert len(re.findall(r"\.png \(", message)) == 5 and message.count("; ...") == 1
    assert "exceeds data.max_bad_images=6" in message and "\n" not in message


def test_missing_images_within_the_limit_drop_their_records_and_are_counted(tmp_path, tiny_tokenizer):
    path = write_chat_data(tmp_path, 10, missing={2, 5})
    cfg = config(path, max_bad_images=2)
    records = load_data(cfg)
    assert len(records.records) == 8 and records.dropped == 2
    assert set(records.missing_images) == {str(tmp_path / "imgs" / "2.png"), str(tmp_path / "imgs" / "5.png")}
    loader = build_dataloader(cfg, tiny_tokenizer, num_image_tokens=N_IMG, batch_size=4, records=records)
    assert sum(b["num_samples"] for b in loader) == 8
    assert loader.stats.total[stats.DROPPED_MISSING_IMAGE] == 2
    assert loader.stats.total[stats.BAD_IMAGE_FILES] == 2


def test_the_parallel_check_finds_exactly_the_missing_files(tmp_path):
    (tmp_path / "present").write_text("x")
    paths = [str(tmp_path / ("present" if i % 7 else f"gone{i}")) for i in range(3000)]
    records = [{"image": p} for p in paths]
    wheres = [f"f.jsonl line {i + 1}" for i in range(len(paths))]
    missing = find_missing_images(records, wheres, threads=8, chunk=100)
    assert missing == {str(tmp_path / f"gone{i}"): f"f.jsonl line {i + 1}" for i in range(0, 3000, 7)}


@pytest.mark.parametrize("workers", [0, 2])
def test_max_bad_images_counts_distinct_files_across_epochs(tmp_path, tiny_tokenizer, workers):
    """The issue's case: 2 undecodable files in a 12-record set with max_bad_images=2 used to stop the run
    within 5 steps (each epoch counted them again). Now 5 epochs (15 steps) run, each skipping the two
    samples, and the two files are counted once. With worker processes, each worker only reports what it
    skipped; the main process (which sees every worker's batches) keeps the distinct files."""
    path = write_chat_data(tmp_path, 12, corrupt={4, 9})
    cfg = config(path, max_bad_images=2, num_workers=workers)
    loader = build_dataloader(cfg, tiny_tokenizer, num_image_tokens=N_IMG, batch_size=4)
    steps = 0
    for _epoch in range(5):
        for batch in loader:
            steps += 1
            assert batch["num_samples"] > 0
    assert steps == 15
    assert loader.stats.total[stats.SAMPLES] == 5 * 10
    assert loader.stats.total[stats.DROPPED_BAD_IMAGE] == 5 * 2  # samples skipped: every epoch
    assert loader.stats.total[stats.BAD_IMAGE_FILES] == 2  # files: once
    assert set(loader.stats.bad_images) == {
        str(tmp_path / "imgs" / "4.png"),
        str(tmp_path / "imgs" / "9.png"),
    }

    cfg.max_bad_images = 1  # the second distinct file, whenever it turns up, is one too many
    loader = build_dataloader(cfg, tiny_tokenizer, num_image_tokens=N_IMG, batch_size=4)
    with pytest.raises(
        ImageLoadError,
        match=r"cannot decode image .*(4|9)\.png \(referenced by .*train\.json record "
        r"(4|9)\).*2 distinct bad image files exceed data\.max_bad_images=1",
    ):
        list(loader)


def test_a_resumed_run_does_not_count_the_same_bad_file_again(tmp_path, tiny_tokenizer):
    path = write_chat_data(tmp_path, 12, corrupt={4, 9})
    cfg = config(path, max_bad_images=2)
    first = build_dataloader(cfg, tiny_tokenizer, num_image_tokens=N_IMG, batch_size=4)
    list(first)
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as JSON-able data
    resumed = build_dataloader(cfg, tiny_tokenizer, num_image_tokens=N_IMG, batch_size=4)
    resumed.load_state_dict(state)
    list(resumed)
    assert resumed.stats.total[stats.BAD_IMAGE_FILES] == 2
    (tmp_path / "imgs" / "0.png").write_bytes(b"now broken too")  # a third distinct file exceeds the limit
    with pytest.raises(
        ImageLoadError, match=r"0\.png.*3 distinct bad image files exceed data\.max_bad_images=2"
    ):
        list(resumed)
