"""Text with inline images and boxes -> token ids.

Images are written in text as ``<img>path</img>``. The reference tokenised the path bytes into the
256 slots and re-read the file inside the model's forward; we tokenise the span as
``[<img>] + [<imgpad>] * N + [</img>]`` and return the paths separately, so pixels are decoded in
DataLoader workers and the path length is unlimited (reference section 2.2, issues #262/#122).

Boxes are ``<box>(x1,y1),(x2,y2)</box>`` with integers in [0, 1000) (docs/design.md "Box convention").

Written text and typed text. Training data and benchmark prompts are *written*: their author wrote the
files, so ``<img>path</img>`` names an image to read and every special token in them (``<|im_end|>``,
``<ref>``) is that token. A chat question is *typed* by whoever reaches the chat, so it is never parsed:
a chat turn is a ``Message`` whose images come as separate pieces (the upload box, ``--image``,
``:image``) and whose text is tokenised with ``typed=True``, which spells every special token out as
plain text except the grounding markup (``TYPED_MARKUP``).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

from models.tokens import (
    BOX_END,
    BOX_START,
    IMG_END,
    IMG_PAD,
    IMG_START,
    QUAD_END,
    QUAD_START,
    REF_END,
    REF_START,
)

# Tokens never split by BPE; we only need the image markers here.
_IMG_MARKER = re.compile(re.escape(IMG_START) + "|" + re.escape(IMG_END))
_BOX = re.compile(re.escape(BOX_START) + r"\((-?\d+),(-?\d+)\),\((-?\d+),(-?\d+)\)" + re.escape(BOX_END))
_BOX_ANY = re.compile(re.escape(BOX_START) + r"(.*?)" + re.escape(BOX_END), re.DOTALL)
COORD_RANGE = 1000  # coordinates are integers in [0, COORD_RANGE)


class ImageTagError(ValueError):
    """An ``<img>`` tag that is unclosed, nested, stray, or holds no path."""


class BoxError(ValueError):
    """A ``<box>`` or quad that is malformed, has coordinates outside [0, 1000), or corners out of order."""


class GroundingTagError(ValueError):
    """``<ref>``/``<box>``/``<quad>`` tags that are unclosed, nested or stray."""


@functools.lru_cache(maxsize=64)
def token_id(tokenizer, token: str) -> int:
    """The id of one (special) token; KeyError if the tokenizer lacks it.

    Not ``tokenizer.get_vocab()[token]``: get_vocab builds a fresh dict of the whole vocabulary on every
    call (0.3 s for Qwen's 151k tokens), which made rendering one SFT sample take seconds. Cached per
    (tokenizer object, token): a token's id never changes once it exists (a miss raises, uncached).
    """
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or (i == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise KeyError(f"the tokenizer has no {token!r} token")
    return i


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
                raise ImageTagError(
                    f"nested {IMG_START} at character {m.start()} (previous opened at {open_at})"
                )
            if m.start() > pos:
                pieces.append(("text", text[pos : m.start()]))
            open_at = m.start()
        else:
            if open_at is None:
                raise ImageTagError(f"{IMG_END} without {IMG_START} at character {m.start()}")
            path = text[open_at + len(IMG_START) : m.start()].strip()
            if not path:
                raise ImageTagError(f"empty image path in {IMG_START}{IMG_END} at character {open_at}")
            pieces.append(("image", path))
            open_at = None
        pos = m.end()
    if open_at is not None:
        raise ImageTagError(f"unclosed {IMG_START} at character {open_at}")
    if pos < len(text):
        pieces.append(("text", text[pos:]))
    return pieces


# The markup a person may type into a chat question: the grounding tags the chat model is trained to read
# in questions ("<ref>the red circle</ref><box>" asks for its box, data/synthetic.py). They name no file
# and end no turn. Every other special token typed is plain text (see tokenize_plain).
TYPED_MARKUP = (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END)
_TYPED_MARKUP = re.compile("|".join(re.escape(t) for t in TYPED_MARKUP))


class TypedMarkupError(ValueError):
    """Typed text holding a token that this tokenizer cannot spell out as plain text."""


def tokenize_plain(tokenizer, text: str, typed: bool = False) -> list[int]:
    """Token ids of text without BOS/EOS (the reference's Qwen tokenizer adds none).

    ``typed=False``: written text; a special token written in it is that token. ``typed=True``: text a
    person typed; only ``TYPED_MARKUP`` is read as tokens, and every other special token of the tokenizer
    (``<img>``, ``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``, ...) is tokenised as the plain text it
    spells (transformers' ``split_special_tokens``), so a question can neither end its turn nor open an
    image. TypedMarkupError where the tokenizer still reads one as a control token (an added token that
    is not marked special): refused rather than obeyed.
    """
    if not text:
        return []
    if not typed:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for kind, piece in _split_typed_markup(text):
        if kind == "markup":
            ids.append(token_id(tokenizer, piece))
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    control = _control_token_ids(tokenizer)
    obeyed = sorted({tokenizer.convert_ids_to_tokens(i) for i in ids if i in control})
    if obeyed:
        raise TypedMarkupError(
            f"the text holds {', '.join(obeyed)}, which this tokenizer reads as a control "
            "token even in typed text; remove it"
        )
    return ids


def _split_typed_markup(text: str) -> Iterator[tuple[str, str]]:
    """``("text", s)`` and ``("markup", tag)`` pieces of typed text, in order."""
    pos = 0
    for m in _TYPED_MARKUP.finditer(text):
        yield "text", text[pos : m.start()]
        yield "markup", m.group()
        pos = m.end()
    yield "text", text[pos:]


def _control_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's added tokens (special or not) other than TYPED_MARKUP: never in typed text."""
    return frozenset(i for t, i in tokenizer.get_added_vocab().items() if t not in TYPED_MARKUP)


def markup_spelt_out(tokenizer, text: str) -> list[str]:
    """The tokens that typed ``text`` holds as plain text but written text would read as tokens: the
    tokenizer's added tokens other than TYPED_MARKUP, in order of first appearance."""
    found = {t: text.find(t) for t in tokenizer.get_added_vocab() if t not in TYPED_MARKUP and t in text}
    return sorted(found, key=found.get)


@dataclass(frozen=True)
class Message:
    """A chat turn given piece by piece and never parsed for markup: ``("image", path)`` pieces for the
    images a person attached, ``("text", s)`` pieces for what they typed (or what the model answered),
    tokenised with ``typed=True``. Adjacent text pieces are tokenised together, as one written string is."""

    pieces: tuple[tuple[str, str], ...]

    @property
    def text(self) -> str:
        """The text pieces joined: what was typed."""
        return "".join(value for kind, value in self.pieces if kind == "text")

    def written(self) -> str:
        """The turn as written text (``<img>path</img>`` for an image): what ``Chat.save`` writes. It reads
        back as the same tokens unless the text holds ``markup_spelt_out`` tokens (Chat.save checks)."""
        return "".join(
            f"{IMG_START}{value}{IMG_END}" if kind == "image" else value for kind, value in self.pieces
        )

    def merged_pieces(self) -> Iterator[tuple[str, str]]:
        text = ""
        for kind, value in self.pieces:
            if kind == "text":
                text += value
                continue
            if text:
                yield "text", text
                text = ""
            yield kind, value
        if text:
            yield "text", text


def encode_text_with_images(
    tokenizer, text: str | Message, num_image_tokens: int
) -> tuple[list[int], list[str]]:
    """Tokenise written text whose images are written ``<img>path</img>``, or a typed ``Message``.

    Each image span becomes ``[<img>] + [<imgpad>] * num_image_tokens + [</img>]``; text between spans
    is tokenised piece by piece (``typed`` for a Message). Returns ``(ids, image_paths)`` with paths in order
    of appearance. ValueError on an unclosed or nested ``<img>`` in written text.
    """
    img_start, img_end, img_pad = (token_id(tokenizer, t) for t in (IMG_START, IMG_END, IMG_PAD))
    typed = isinstance(text, Message)
    pieces = text.merged_pieces() if typed else split_image_spans(text)
    ids: list[int] = []
    paths: list[str] = []
    for kind, value in pieces:
        if kind == "image":
            ids += [img_start] + [img_pad] * num_image_tokens + [img_end]
            paths.append(value)
        else:
            ids += tokenize_plain(tokenizer, value, typed=typed)
    return ids, paths


# ----------------------------------------------------------------------------------------------- boxes


def normalize_coord(value: float, size: float) -> int:
    """Pixel coordinate -> integer in [0, 1000): ``min(999, floor(value * 1000 / size))``."""
    if size <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    return max(0, min(COORD_RANGE - 1, math.floor(value * COORD_RANGE / size)))


def normalize_box(
    box_xyxy: tuple[float, float, float, float] | list[float], width: float, height: float
) -> tuple[int, int, int, int]:
    """A pixel box (x1, y1, x2, y2) -> integers in [0, 1000) by the box convention."""
    x1, y1, x2, y2 = box_xyxy
    return (
        normalize_coord(x1, width),
        normalize_coord(y1, height),
        normalize_coord(x2, width),
        normalize_coord(y2, height),
    )


def denormalize_box(
    box: tuple[int, int, int, int] | list[int], width: float, height: float
) -> tuple[float, float, float, float]:
    """Integers in [0, 1000) -> pixels: ``x / 1000 * width`` (the same divisor as training)."""
    x1, y1, x2, y2 = box
    return (
        x1 / COORD_RANGE * width,
        y1 / COORD_RANGE * height,
        x2 / COORD_RANGE * width,
        y2 / COORD_RANGE * height,
    )


def validate_box(box: tuple[int, ...] | list[int]) -> None:
    """BoxError unless every coordinate is an integer in [0, 1000) and x1 <= x2, y1 <= y2."""
    if len(box) != 4:
        raise BoxError(f"a box has 4 coordinates, got {list(box)}")
    for c in box:
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < COORD_RANGE:
            raise BoxError(
                f"box coordinate {c!r} outside the integer range [0, {COORD_RANGE}) in {list(box)}"
            )
    x1, y1, x2, y2 = box
    if x1 > x2 or y1 > y2:
        raise BoxError(f"box corners out of order (need x1<=x2, y1<=y2): {list(box)}")


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
                raise BoxError(f"point coordinate {c!r} outside the integer range [0, {COORD_RANGE})")
    return ",".join(f"({x},{y})" for x, y in points)


def parse_boxes(text: str) -> list[tuple[int, int, int, int]]:
    """Every ``<box>(x1,y1),(x2,y2)</box>`` in text, validated;
    BoxError on a malformed or out-of-range box."""
    boxes = []
    for m in _BOX_ANY.finditer(text):
        strict = _BOX.fullmatch(m.group())
        if strict is None:
            raise BoxError(f"malformed box {m.group()!r}; expected {BOX_START}(x1,y1),(x2,y2){BOX_END}")
        box = tuple(int(g) for g in strict.groups())
        validate_box(list(box))
        boxes.append(box)
    return boxes


# ------------------------------------------------------------------------- <ref>/<box>/<quad> structure

_GROUNDING_TAG = re.compile(
    "|".join(re.escape(t) for t in (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END))
)
_QUAD_ANY = re.compile(re.escape(QUAD_START) + r"(.*?)" + re.escape(QUAD_END), re.DOTALL)
_QUAD_POINTS = re.compile(r"\((-?\d+),(-?\d+)\),\((-?\d+),(-?\d+)\),\((-?\d+),(-?\d+)\),\((-?\d+),(-?\d+)\)")


def check_grounding_tags(text: str, open_box_at_end: bool = False) -> None:
    """Check that ``<ref>``, ``<box>`` and ``<quad>`` tags pair up without nesting (GroundingTagError),
    and that every box and quad is well formed with coordinates in [0, 1000) (BoxError).

    ``open_box_at_end``: the text is a prompt that may end with an open ``<box>``, the grounding prompt
    ``<ref>x</ref><box>`` whose answer ``(x1,y1),(x2,y2)</box>`` completes it. Training itself validates
    only the boxes (parse_boxes); the rest is for ``python -m data.check``.
    """
    open_tag, open_at = None, 0
    for m in _GROUNDING_TAG.finditer(text):
        tag = m.group()
        if not tag.startswith("</"):
            if open_tag is not None:
                raise GroundingTagError(
                    f"{tag} at character {m.start()} inside the {open_tag} opened at {open_at}"
                )
            open_tag, open_at = tag, m.start()
        else:
            opener = tag.replace("/", "", 1)
            if open_tag != opener:
                raise GroundingTagError(f"{tag} at character {m.start()} without a matching {opener}")
            open_tag = None
    prompt_box = open_box_at_end and open_tag == BOX_START and not text[open_at + len(BOX_START) :].strip()
    if open_tag is not None and not prompt_box:
        raise GroundingTagError(f"unclosed {open_tag} at character {open_at}")
    parse_boxes(text)
    for m in _QUAD_ANY.finditer(text):
        strict = _QUAD_POINTS.fullmatch(m.group(1))
        if strict is None:
            raise BoxError(
                f"malformed quad {m.group()!r}; expected {QUAD_START}(x,y),(x,y),(x,y),(x,y){QUAD_END}"
            )
        coords = [int(g) for g in strict.groups()]
        format_points(list(zip(coords[0::2], coords[1::2])))  # BoxError outside [0, 1000)
