"""Image files -> normalised pixel tensors (reference section 1.4: bicubic squash, CLIP mean/std). Reading and
checking the file is data.image_files'.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from data.image_files import decode_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_image(path: str | Path, image_size: int, where: str = "", data: bytes | None = None) -> torch.Tensor:
    """Read an image as FloatTensor [3, S, S]: RGB, squashed (aspect ratio not kept) to S x S with bicubic
    resampling, normalised with the CLIP mean/std. ``where`` (e.g. "train.json record 12") goes into errors.
    ``data``: the file's bytes when they are in memory already (a WebDataset member); ``path`` names them.
    """
    rgb = decode_image(path, where, data, size=image_size)
    # Resize the PIL image (as the reference's transforms.Resize((S, S), BICUBIC) did), not a float
    # tensor: PIL's bicubic antialiases when downscaling and torch's does not by default.
    resized = TF.resize(rgb, [image_size, image_size], interpolation=InterpolationMode.BICUBIC)
    pixels = TF.to_tensor(resized)
    return TF.normalize(pixels, CLIP_MEAN, CLIP_STD)
