"""Images that cannot hurt (issue 27): one pixel cap checked on the header before any decode, every decode
failure an ImageLoadError, and JPEGs decoded at a reduced scale before the resize."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from data.image_files import (
    IMAGE_FORMATS,
    MAX_IMAGE_PIXELS,
    ImageLoadError,
    decode_image,
    image_size_of,
    open_image,
)
from data.images import CLIP_MEAN, CLIP_STD, load_image


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height RGB pixels (a decompression bomb when that is large):
    a valid IHDR with its CRC, a few rows of compressed zeros, IEND. Written by hand because Pillow would
    have to hold the whole image in memory to save one."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 4096, 9))
        + chunk(b"IEND", b"")
    )


def test_the_cap_is_far_above_a_photo_and_far_below_a_bomb():
    assert 50_000_000 < MAX_IMAGE_PIXELS < 30000 * 30000 // 10


@pytest.mark.parametrize("width, height", [(30000, 30000), (10000, 10000), (9000, 8000)])
def test_a_header_over_the_cap_is_refused_by_every_reader(tmp_path, width, height):
    """30000x30000 trips Pillow's own bomb error, 10000x10000 its warning, 9000x8000 (72M) only our cap:
    each is the same named ImageLoadError, from the header alone (the file holds a few rows of pixels)."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(width, height))
    for read in (
        lambda: image_size_of(path, "t.json record 3"),
        lambda: decode_image(path, "t.json record 3"),
        lambda: load_image(path, 448, "t.json record 3"),
    ):
        with pytest.raises(
            ImageLoadError,
            match=r"bomb\.png \(referenced by t\.json record 3\) .*over the cap of "
            r"64,000,000",
        ) as err:
            read()
        assert err.value.path == str(path)
    if width * height < 89_478_485:  # under Pillow's limits, our message says what the header claims
        with pytest.raises(ImageLoadError, match=r"9000x8000 = 72,000,000 pixels"):
            image_size_of(path)


def test_a_header_at_the_cap_is_read(tmp_path):
    path = tmp_path / "at_cap.png"
    path.write_bytes(png_claiming(8000, 8000))  # exactly 64M
    assert image_size_of(path) == (8000, 8000)


def test_a_damaged_file_is_an_image_load_error_whatever_pillow_raises(tmp_path):
    path = tmp_path / "cut.png"
    Image.effect_noise((64, 64), 40).convert("RGB").save(path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ImageLoadError, match=r"cannot decode image .*cut\.png"):
        load_image(path, 32)
    with pytest.raises(ImageLoadError, match=r"cannot decode image shard\.tar/k\.jpg"):
        decode_image("shard.tar/k.jpg", data=b"\xff\xd8\xff garbage")


def write_gradient_jpeg(path, size):
    Image.linear_gradient("L").resize(size).convert("RGB").save(path, quality=95)


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_before_the_resize(tmp_path):
    """4000x3000 for 448 px: the DCT scale 1/4 is the smallest that still covers 448 on each side (1/8 would
    give 500x375), so 1000x750 pixels are decoded instead of 12M; the resized image is the same picture."""
    path = tmp_path / "photo.jpg"
    write_gradient_jpeg(path, (4000, 3000))
    assert decode_image(path).size == (4000, 3000)
    assert decode_image(path, size=448).size == (1000, 750)
    assert decode_image(path, size=2000).size == (4000, 3000)  # no scale covers 2000 px on both sides
    full = TF.resize(decode_image(path), [448, 448], interpolation=InterpolationMode.BICUBIC)
    expected = TF.normalize(TF.to_tensor(full), CLIP_MEAN, CLIP_STD)
    assert (load_image(path, 448) - expected).abs().mean() < 0.02


def test_formats_without_reduced_decoding_decode_whole(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (1000, 800), (10, 20, 30)).save(path)
    assert decode_image(path, size=100).size == (1000, 800)
    assert load_image(path, 100).shape == torch.Size([3, 100, 100])


def test_only_photo_formats_are_decoded_so_an_eps_file_never_reaches_ghostscript(tmp_path):
    path = tmp_path / "page.png"  # the name hides what it is; Pillow would pick its EPS plugin from the bytes
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(ImageLoadError, match="cannot decode image .*page.png"):
        open_image(path)  # refused at the header: no plugin outside IMAGE_FORMATS is tried
    assert "EPS" not in IMAGE_FORMATS
