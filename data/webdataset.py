"""WebDataset shards of image-caption pairs (LAION, DataComp, COYO, any img2dataset output).

A sample is the tar members sharing a key: ``000123.jpg`` + ``000123.txt`` (or ``000123.json``). Which
member is the image and which holds the caption is configurable (``data.wds_image_keys``,
``data.wds_caption_key``); ``pair_of`` turns a sample into the pretraining pair our caption template
renders (the same path as JSONL pairs) plus the image's bytes, which are decoded in DataLoader workers.
``write_shards`` writes pairs as shards (``python -m data.synthetic --webdataset``) with webdataset's
TarWriter. Reading (with offsets, for O(1) resume) is data.shards.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from webdataset import TarWriter

from models.errors import UserError

DEFAULT_IMAGE_KEYS = "jpg;png;webp"
DEFAULT_CAPTION_KEY = "txt"


class BadSample(ValueError):
    """A sample without a usable image or caption member: skipped and counted under data.max_bad_images."""


def parse_image_keys(spec: str) -> list[str]:
    """``"jpg;png;webp"`` -> the member extensions tried in order for the image."""
    keys = [k.strip().lower() for k in spec.split(";") if k.strip()]
    if not keys:
        raise UserError(f"data.wds_image_keys={spec!r}: give at least one extension, e.g. 'jpg;png;webp'")
    return keys


def parse_caption_key(spec: str) -> tuple[str, str | None]:
    """``"txt"`` -> (member ``txt``, whole text); ``"json:caption"`` -> (member ``json``, its field
    ``caption``)."""
    member, _, field = spec.partition(":")
    if not member.strip() or (":" in spec and not field.strip()):
        raise UserError(
            f"data.wds_caption_key={spec!r}: expected a member extension ('txt') or "
            "'MEMBER:FIELD' for a field of a JSON member ('json:caption')"
        )
    return member.strip().lower(), field.strip() or None


def pair_of(
    sample: dict, url: str, image_keys: list[str], caption_key: tuple[str, str | None]
) -> tuple[dict, bytes]:
    """A sample's ``{image, caption}`` record (the image named ``URL/KEY.EXT`` for
    messages) and image bytes."""
    ext = next((k for k in image_keys if k in sample), None)
    members = sorted(k for k in sample if k != "__key__")
    if ext is None:
        raise BadSample(f"no image member ({' or '.join(image_keys)}); the sample has {members}")
    member, field = caption_key
    if member not in sample:
        raise BadSample(f"no caption member {member!r}; the sample has {members}")
    try:
        text = sample[member].decode("utf-8")
        caption = json.loads(text)[field] if field else text
    except UnicodeDecodeError as e:
        raise BadSample(f"caption member {member!r} is not UTF-8 text") from e
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise BadSample(f"member {member!r} is not a JSON object with a {field!r} field") from e
    if not isinstance(caption, str) or not caption.strip():
        raise BadSample(f"empty or non-text caption in {member!r}{f' field {field!r}' if field else ''}")
    return {"image": f"{url}/{sample['__key__']}.{ext}", "caption": caption.strip()}, sample[ext]


def write_shards(samples: Iterable[dict], out_dir: str | Path, prefix: str, per_shard: int) -> list[Path]:
    """Write webdataset samples (``{"__key__": str, ext: bytes, ...}``) into ``out_dir/PREFIX-NNNNNN.tar``,
    ``per_shard`` samples each; returns the shard paths. Member times are 0: same samples, same bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    writer = None
    for i, sample in enumerate(samples):
        if i % per_shard == 0:
            if writer is not None:
                writer.close()
            paths.append(out_dir / f"{prefix}-{len(paths):06d}.tar")
            writer = TarWriter(str(paths[-1]), encoder=False, mtime=0)
        writer.write(sample)
    if writer is not None:
        writer.close()
    return paths


def shard_pattern(paths: list[Path]) -> str:
    """The brace pattern naming ``paths`` written by ``write_shards``
    (``.../pretrain-{000000..000019}.tar``)."""
    first, last = paths[0], paths[-1]
    prefix = first.name.rsplit("-", 1)[0]
    if len(paths) == 1:
        return str(first)
    return str(
        first.parent / f"{prefix}-{{{first.stem.rsplit('-', 1)[1]}..{last.stem.rsplit('-', 1)[1]}}}.tar"
    )
