"""Image files -> normalised pixel tensors (reference section 1.4: bicubic squash, CLIP mean/std)."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from models.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageLoadError(UserError):
    """An image that is missing or cannot be decoded; the message names the file (and record when known).
    ``path`` is the file (the data pipeline counts distinct bad files against data.max_bad_images)."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)


def decode_image(path: str | Path, where: str = "", data: bytes | None = None) -> Image.Image:
    """The whole image decoded as RGB; ImageLoadError (naming the file and ``where``) if missing or corrupt.
    ``data``: the file's bytes when they are in memory already (a WebDataset member); ``path`` names them."""
    suffix = f" (referenced by {where})" if where else ""
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as img:
            return img.convert("RGB")  # convert() forces a full decode, so truncated files fail here
    except FileNotFoundError as e:
        raise ImageLoadError(f"image file not found: {path}{suffix}", path) from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageLoadError(f"cannot decode image {path}{suffix}: {e}", path) from e


def load_image(path: str | Path, image_size: int, where: str = "", data: bytes | None = None) -> torch.Tensor:
    """Read an image as FloatTensor [3, S, S]: RGB, squashed (aspect ratio not kept) to S x S with bicubic
    resampling, normalised with the CLIP mean/std. ``where`` (e.g. "train.json record 12") goes into errors.
    ``data``: the file's bytes when they are in memory already (a WebDataset member); ``path`` names them.
    """
    rgb = decode_image(path, where, data)
    # Resize the PIL image (as the reference's transforms.Resize((S, S), BICUBIC) did), not a float
    # tensor: PIL's bicubic antialiases when downscaling and torch's does not by default.
    resized = TF.resize(rgb, [image_size, image_size], interpolation=InterpolationMode.BICUBIC)
    pixels = TF.to_tensor(resized)
    return TF.normalize(pixels, CLIP_MEAN, CLIP_STD)


def image_size_of(path: str | Path, where: str = "") -> tuple[int, int]:
    """(width, height) from the file header (no full decode); used to normalise pixel boxes."""
    suffix = f" (referenced by {where})" if where else ""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError as e:
        raise ImageLoadError(f"image file not found: {path}{suffix}", path) from e
    except (UnidentifiedImageError, OSError) as e:
        raise ImageLoadError(f"cannot read image {path}{suffix}: {e}", path) from e


