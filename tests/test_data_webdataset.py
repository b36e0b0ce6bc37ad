"""data.format: webdataset: tar shards of image-caption pairs go through the same caption template,
tokenisation and image pipeline as JSONL pairs; keys are configurable; bad samples are counted under
max_bad_images; fewer shards than readers is said and handled; data.synthetic writes shards."""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile

import pytest
import torch
from PIL import Image

from data import stats
from data.dataset import DataConfig, build_dataloader
from data.image_files import ImageLoadError
from data.synthetic import generate
from data.webdataset import write_shards
from models.errors import UserError

N_IMG = 2


def image_bytes(i: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (10, 6), (40 * i % 256, 100, 0)).save(buf, format=fmt)
    return buf.getvalue()


def ids_of(batches, tok) -> list[int]:
    return [
        int(m)
        for b in batches
        for row in b["input_ids"]
        for m in re.findall(r"English: n(\d+)", tok.decode(row))
    ]


def loader_for(paths, tok, **overrides):
    cfg = DataConfig(
        **{
            "paths": paths,
            "format": "webdataset",
            "image_size": 16,
            "max_len": 64,
            "num_workers": 0,
            "shuffle": False,
            **overrides,
        }
    )
    return build_dataloader(cfg, tok, num_image_tokens=N_IMG, batch_size=2)


def test_synthetic_shards_hold_the_pretraining_pairs_and_load_exactly_like_the_jsonl(tmp_path):
    manifest = generate(tmp_path, seed=0, n_train=10, n_eval=2, vocab_size=400, webdataset_shard_size=4)
    entry = manifest["files"]["pretrain_webdataset"]
    assert entry == {
        "path": "webdataset/pretrain-{000000..000002}.tar",
        "split": "train",
        "count": 10,
        "format": "WebDataset shards of the pretraining pairs (png, txt, json)",
    }
    pairs = [json.loads(line) for line in (tmp_path / "pretrain.jsonl").read_text().splitlines()]
    with tarfile.open(tmp_path / "webdataset" / "pretrain-000000.tar") as tar:
        assert tar.getnames()[:3] == ["000000.json", "000000.png", "000000.txt"]
        assert tar.extractfile("000000.txt").read().decode() == pairs[0]["caption"]
        assert tar.extractfile("000000.png").read() == (tmp_path / pairs[0]["image"]).read_bytes()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    common = {"image_size": 28, "max_len": 512, "num_workers": 0, "shuffle": False, "streaming": True}
    wds = build_dataloader(
        DataConfig(paths=[str(tmp_path / entry["path"])], format="webdataset", **common), tok, 4, 3
    )
    jsonl = build_dataloader(
        DataConfig(paths=[str(tmp_path / "pretrain.jsonl")], format="pretrain", **common), tok, 4, 3
    )
    batches = list(zip(wds, jsonl, strict=True))
    assert len(batches) == 4
    for a, b in batches:  # the same template, tokens and pixels
        assert a.keys() == b.keys()
        for key in ("input_ids", "labels", "pixel_values"):
            assert torch.equal(a[key], b[key])
    # two runs of the generator write identical shards
    generate(tmp_path / "again", seed=0, n_train=10, n_eval=2, vocab_size=400, webdataset_shard_size=4)
    assert (tmp_path / "again/webdataset/pretrain-000002.tar").read_bytes() == (
        tmp_path / "webdataset/pretrain-000002.tar"
    ).read_bytes()


def test_image_and_caption_keys_are_configurable(tmp_path, tiny_tokenizer):
    samples = [
        {
            "__key__": f"{i:03d}",
            "jpg": image_bytes(i, "JPEG"),
            "png": image_bytes(i),
            "json": json.dumps({"caption": f"n{i}", "url": "x"}).encode(),
            "txt": b"not this",
        }
        for i in range(4)
    ]
    write_shards(samples, tmp_path, "k", 10)
    shard = str(tmp_path / "k-000000.tar")
    loader = loader_for([shard], tiny_tokenizer, wds_caption_key="json:caption")
    assert ids_of(loader, tiny_tokenizer) == [0, 1, 2, 3]
    # the first key present wins: png here gives the PNG's exact pixels, jpg (default first) the JPEG's
    png, jpg = (
        next(iter(loader_for([shard], tiny_tokenizer, wds_image_keys=k, wds_caption_key="json:caption")))
        for k in ("webp;png", "jpg;png;webp")
    )
    assert not torch.equal(png["pixel_values"], jpg["pixel_values"])
    with pytest.raises(ValueError, match="json:caption"):
        loader_for([shard], tiny_tokenizer, wds_caption_key="json:")


def test_bad_samples_fail_naming_shard_and_key_or_are_skipped_and_counted_under_max_bad_images(
    tmp_path, tiny_tokenizer
):
    samples = [{"__key__": f"{i:03d}", "png": image_bytes(i), "txt": f"n{i}".encode()} for i in range(6)]
    samples[1]["png"] = b"not an image"
    del samples[4]["txt"]
    write_shards(samples, tmp_path, "bad", 3)
    both = [str(tmp_path / "bad-{000000..000001}.tar")]
    with pytest.raises(ImageLoadError, match=r"cannot decode image .*bad-000000\.tar/001\.png"):
        list(loader_for(both, tiny_tokenizer))
    with pytest.raises(UserError, match=r"bad-000001\.tar record 1 \(key '004'\): no caption member 'txt'"):
        list(loader_for([str(tmp_path / "bad-000001.tar")], tiny_tokenizer))
    loader = loader_for(both, tiny_tokenizer, max_bad_images=2)
    assert ids_of(loader, tiny_tokenizer) == [0, 2, 3, 5]
    assert (
        loader.stats.total[stats.DROPPED_BAD_IMAGE] == 1 and loader.stats.total[stats.DROPPED_BAD_SAMPLE] == 1
    )
    with pytest.raises(ImageLoadError, match="2 distinct bad image files exceed data.max_bad_images=1"):
        list(loader_for(both, tiny_tokenizer, max_bad_images=1))


def test_fewer_shards_than_readers_is_said_and_every_sample_is_still_read_once(
    tmp_path, tiny_tokenizer, caplog
):
    write_shards(
        ({"__key__": f"{i:03d}", "png": image_bytes(i), "txt": f"n{i}".encode()} for i in range(15)),
        tmp_path,
        "few",
        5,
    )
    pattern = str(tmp_path / "few-{000000..000002}.tar")
    seen = []
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        for rank in (0, 1):
            cfg = DataConfig(paths=[pattern], format="webdataset", image_size=16, max_len=64, num_workers=2)
            seen += ids_of(
                build_dataloader(cfg, tiny_tokenizer, N_IMG, batch_size=2, rank=rank, world_size=2),
                tiny_tokenizer,
            )
    assert "3 shards for 4 readers (2 ranks x 2 workers): readers share shards" in caplog.text
    assert sorted(seen) == list(range(15))


def test_webdataset_implies_streaming_and_shard_kinds_must_match_the_format(tmp_path, tiny_tokenizer):
    assert DataConfig(paths=["x.tar"], format="webdataset").streaming
    (tmp_path / "a.jsonl").write_text("")
    write_shards([{"__key__": "0", "png": image_bytes(0), "txt": b"n0"}], tmp_path, "t", 1)
    with pytest.raises(UserError, match="webdataset reads .tar shards"):
        loader_for([str(tmp_path / "a.jsonl")], tiny_tokenizer)
    with pytest.raises(UserError, match="set data.format: webdataset"):
        loader_for([str(tmp_path / "t-000000.tar")], tiny_tokenizer, format="pretrain", streaming=True)
    with pytest.raises(UserError, match="must all be of one kind"):
        loader_for([str(tmp_path / "t-000000.tar"), str(tmp_path / "a.jsonl")], tiny_tokenizer)
