"""Text with inline images and boxes -> token ids.

Images are written in text as ``<img>path</img>``. The reference tokenised the path bytes into the
256 slots and re-read the file inside the model's forward; we tokenise the span as
``[<img>] + [<imgpad>] * N + [</img>]`` and return the paths separately, so pixels are decoded in
DataLoader workers and the path length is unlimited (reference section 2.2, issues #262/#122).

Boxes are ``<box>(x1,y1),(x2,y2)</box>`` with integers in [0, 1000) (docs/design.md "Box convention").
"""

from __future__ import annotations

import math
import re

from models.tokens import BOX_END, BOX_START, IMG_END, IMG_PAD, IMG_START

# Tokens never split by BPE; we only need the image markers here.
_IMG_MARKER = re.compile(re.escape(IMG_START) + "|" + re.escape(IMG_END))
_BOX = re.compile(re.escape(BOX_START) + r"\((-?\d+),(-?\d+)\),\((-?\d+),(-?\d+)\)" + re.escape(BOX_END))
_BOX_ANY = re.compile(re.escape(BOX_START) + r"(.*?)" + re.escape(BOX_END), re.DOTALL)
COORD_RANGE = 1000  # coordinates are integers in [0, COORD_RANGE)


def split_image_spans(text: str) -> list[tuple[str, str]]:
    """Split text into ``("text", s)`` and ``("image", path)`` pieces, in order.

    ValueError on an unclosed ``<img>``, a stray ``</img>``, a nested ``<img>`` or an empty path.
    """
    pieces: list[tuple[str, str]] = []
    pos = 0
    open_at: int | None = None
    for m in _IMG_MARKER.finditer(text):
        if m.group() == IMG_START:
            if open_at is not None:
                raise ValueError(f"nested {IMG_START} at character {m.start()} (previous opened at {open_at})")
            if m.start() > pos:
                pieces.append(("text", text[pos : m.start()]))
            open_at = m.start()
        else:
            if open_at is None:
                raise ValueError(f"{IMG_END} without {IMG_START} at character {m.start()}")
            path = text[open_at + len(IMG_START) : m.start()].strip()
            if not path:
                raise ValueError(f"empty image path in {IMG_START}{IMG_END} at character {open_at}")
            pieces.append(("image", path))
            open_at = None
        pos = m.end()
    if open_at is not None:
        raise ValueError(f"unclosed {IMG_START} at character {open_at}")
    if pos < len(text):
        pieces.append(("text", text[pos:]))
    return pieces


def tokenize_plain(tokenizer, text: str) -> list[int]:
    """Token ids of text without BOS/EOS (the reference's Qwen tokenizer adds none)."""
    if not text:
        return []
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_text_with_images(tokenizer, text: str, num_image_tokens: int) -> tuple[list[int], list[str]]:
    """Tokenise text whose images are written ``<img>path</img>``.

    Each image span becomes ``[<img>] + [<imgpad>] * num_image_tokens + [</img>]``; text between spans
    is tokenised piece by piece. Returns ``(ids, image_paths)`` with paths in order of appearance.
    ValueError on an unclosed or nested ``<img>``.
    """
    vocab = tokenizer.get_vocab()
    img_start, img_end, img_pad = vocab[IMG_START], vocab[IMG_END], vocab[IMG_PAD]
    ids: list[int] = []
    paths: list[str] = []
    for kind, value in split_image_spans(text):
        if kind == "image":
            ids += [img_start] + [img_pad] * num_image_tokens + [img_end]
            paths.append(value)
        else:
            ids += tokenize_plain(tokenizer, value)
    return ids, paths


# ----------------------------------------------------------------------------------------------- boxes


def normalize_coord(value: float, size: float) -> int:
    """Pixel coordinate -> integer in [0, 1000): ``min(999, floor(value * 1000 / size))``."""
    if size <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    return max(0, min(COORD_RANGE - 1, math.floor(value * COORD_RANGE / size)))


def normalize_box(box_xyxy: tuple[float, float, float, float] | list[float], width: float, height: float) -> tuple[int, int, int, int]:
    """A pixel box (x1, y1, x2, y2) -> integers in [0, 1000) by the box convention."""
    x1, y1, x2, y2 = box_xyxy
    return (normalize_coord(x1, width), normalize_coord(y1, height),
            normalize_coord(x2, width), normalize_coord(y2, height))


def denormalize_box(box: tuple[int, int, int, int] | list[int], width: float, height: float) -> tuple[float, float, float, float]:
    """Integers in [0, 1000) -> pixels: ``x / 1000 * width`` (the same divisor as training)."""
    x1, y1, x2, y2 = box
    return (x1 / COORD_RANGE * width, y1 / COORD_RANGE * height, x2 / COORD_RANGE * width, y2 / COORD_RANGE * height)


def validate_box(box: tuple[int, ...] | list[int]) -> None:
    """ValueError unless every coordinate is an integer in [0, 1000) and x1 <= x2, y1 <= y2."""
    if len(box) != 4:
        raise ValueError(f"a box has 4 coordinates, got {list(box)}")
    for c in box:
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < COORD_RANGE:
            raise ValueError(f"box coordinate {c!r} outside the integer range [0, {COORD_RANGE}) in {list(box)}")
    x1, y1, x2, y2 = box
    if x1 > x2 or y1 > y2:
        raise ValueError(f"box corners out of order (need x1<=x2, y1<=y2): {list(box)}")


def format_box(box: tuple[int, int, int, int] | list[int]) -> str:
    """``<box>(x1,y1),(x2,y2)</box>`` after validating the coordinates."""
    validate_box(list(box))
    x1, y1, x2, y2 = box
    return f"{BOX_START}({x1},{y1}),({x2},{y2}){BOX_END}"


def format_points(points: list[tuple[int, int]]) -> str:
    """``(x1,y1),(x2,y2),...`` for quads (no tags); coordinates validated to [0, 1000)."""
    for x, y in points:
        for c in (x, y):
            if not isinstance(c, int) or not 0 <= c < COORD_RANGE:
                raise ValueError(f"point coordinate {c!r} outside the integer range [0, {COORD_RANGE})")
    return ",".join(f"({x},{y})" for x, y in points)


def parse_boxes(text: str) -> list[tuple[int, int, int, int]]:
    """Every ``<box>(x1,y1),(x2,y2)</box>`` in text, validated; ValueError on a malformed or out-of-range box."""
    boxes = []
    for m in _BOX_ANY.finditer(text):
        strict = _BOX.fullmatch(m.group())
        if strict is None:
            raise ValueError(f"malformed box {m.group()!r}; expected {BOX_START}(x1,y1),(x2,y2){BOX_END}")
        box = tuple(int(g) for g in strict.groups())
        validate_box(list(box))
        boxes.append(box)
    return boxes
