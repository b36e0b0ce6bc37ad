"""Image files, read as untrusted input: the header first (format and pixel cap), then the decode.

Every image is untrusted input: one that is missing, over the pixel cap or cannot be decoded for any reason
is an ``ImageLoadError`` (a named line, counted against ``data.max_bad_images`` in training and data.check,
an ``error:`` line in eval and chat), never a raw Pillow exception. Pillow only: the tools that read images
without making tensors of them (scoring, boxes in pixels) load no torch.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image

from models.errors import UserError

# The project-wide pixel cap: an image whose header claims more pixels is refused before it is decoded.
# Well above any real photo (a 50 MP camera: 8192 x 5464 = 45M) and far below a decompression bomb (a
# 167-byte PNG can claim 30000 x 30000 = 900M pixels, 2.7 GB decoded). docs/data.md says so.
MAX_IMAGE_PIXELS = 64_000_000

# Pillow warns (DecompressionBombWarning) on opening an image over its own limit (89M pixels), before the
# cap above can be checked; as an error it is caught and reported like every other image over the cap.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

# The formats an image may be in. Pillow otherwise tries every plugin it has, EPS among them, which hands the
# file to Ghostscript: an untrusted file should reach only the decoders of the formats photos come in.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO")


class ImageLoadError(UserError):
    """An image that is missing, over the pixel cap or cannot be decoded; the message names the file (and
    record when known). ``path`` is the file (the data pipeline counts distinct bad files against
    data.max_bad_images)."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)


def open_image(
    path: str | Path, where: str = "", data: bytes | None = None, doing: str = "decode"
) -> Image.Image:
    """The image with only its header read (no pixel decoded yet), refused when over MAX_IMAGE_PIXELS.
    The caller closes it (``with open_image(...) as img``). ``where`` (e.g. "train.json record 12") and
    ``data`` (the file's bytes when already in memory, a WebDataset member that ``path`` names): as in
    load_image. ``doing``: what a header that cannot be read stops ("cannot {doing} image ...")."""
    suffix = f" (referenced by {where})" if where else ""
    try:
        img = Image.open(io.BytesIO(data) if data is not None else path, formats=IMAGE_FORMATS)
    except FileNotFoundError as e:
        raise ImageLoadError(f"image file not found: {path}{suffix}", path) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(
            f"image {path}{suffix} is over the cap of {MAX_IMAGE_PIXELS:,} pixels "
            f"(data.image_files.MAX_IMAGE_PIXELS; Pillow says: {e})",
            path,
        ) from e
    except Exception as e:  # Pillow's format plugins raise many types on a malformed header, not only OSError
        raise ImageLoadError(f"cannot {doing} image {path}{suffix}: {e}", path) from e
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        img.close()
        raise ImageLoadError(
            f"image {path}{suffix} is {width}x{height} = {width * height:,} pixels, over "
            f"the cap of {MAX_IMAGE_PIXELS:,} (data.image_files.MAX_IMAGE_PIXELS)",
            path,
        )
    return img


def decode_image(
    path: str | Path, where: str = "", data: bytes | None = None, size: int | None = None
) -> Image.Image:
    """The image decoded as RGB; ImageLoadError (naming the file and ``where``) if missing, over the pixel
    cap or corrupt. ``size``: the side it will be resized to; a format that can decode at a reduced scale
    (JPEG: ``Image.draft``, 1/2 to 1/8) is decoded at the smallest scale still at least ``size`` pixels on
    each side, so a large photo never takes its full size in memory. Other arguments: as in load_image."""
    with open_image(path, where, data) as img:
        try:
            if size is not None:
                img.draft("RGB", (size, size))
            return img.convert("RGB")  # convert() forces the decode, so truncated files fail here
        except Exception as e:  # a damaged file fails inside any of Pillow's decoders, with many types
            suffix = f" (referenced by {where})" if where else ""
            raise ImageLoadError(f"cannot decode image {path}{suffix}: {e}", path) from e


def image_size_of(path: str | Path, where: str = "") -> tuple[int, int]:
    """(width, height) from the file header (no decode; over the pixel cap: ImageLoadError); used to
    normalise pixel boxes and to check an image given to the chat."""
    with open_image(path, where, doing="read") as img:
        return img.size
