"""Grounding boxes in each HF family's own convention, to and from the project's.

The project writes boxes Qwen-VL's way (docs/data.md "Box convention"):
``<ref>label</ref><box>(x1,y1),(x2,y2)</box>``, integers in [0, 1000) relative to the original image,
``floor(x * 1000 / width)``. The families (reference 5):

| convention (specs) | family | text | coordinates |
|---|---|---|---|
| ``box_tokens_1000`` | Qwen2-VL | box tokens (below) | 0..1000 of the image |
| ``json_absolute`` | Qwen2.5-VL | JSON (below) | pixels of the *resized* image |
| ``json_1000`` | Qwen3-VL | the same JSON | 0..1000 of the image |

The text of one box labelled ``l``, in box tokens:
``<|object_ref_start|>l<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``; in JSON:
``{"bbox_2d": [x1, y1, x2, y2], "label": "l"}``.

Training data in (``boxes_to_family``): every ``<ref>l</ref>`` followed by boxes (or a bare box) is rewritten.
In the JSON conventions an answer made of boxes only becomes the cookbooks' fenced list
(```` ```json\\n[\\n\\t{...},\\n\\t{...}\\n]\\n``` ````); a box inside running text becomes one inline object.
A grounding prompt ending in an open box, ``<ref>l</ref><box>`` (Qwen-VL's task phrasing), becomes the
family's own request: ``<|object_ref_start|>l<|object_ref_end|>`` for Qwen2-VL, the cookbook's "Locate l,
output its bbox coordinates using JSON format." for the JSON families.

Answers out (``boxes_from_family``, ``family_answer_to_qwen_vl``): the boxes of a family's answer in the
project's convention, so eval_mm's metrics and chat drawing read them as they read Qwen-VL's. Qwen2-VL's box
tokens are special tokens: decode its answers with ``skip_special_tokens=False``.

Relative coordinates are carried as they are (both are thousandths of the image). For absolute pixels, a
project coordinate c stands for the pixels [c, c+1) x size / 1000; the family gets the middle of that range
on the resized image, rounded and kept inside it (at most side - 1, as the official notebook does), so the
round trip is exact when the resized side has at least 1000 pixels and within 1000 / side + 1 thousandths
otherwise (pinned in tests/test_data_hf_boxes.py).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from data.text import COORD_RANGE, validate_box
from models.families.specs import BOX_JSON_1000, BOX_JSON_ABSOLUTE, BOX_TOKENS_1000
from models.tokens import BOX_END, BOX_START, QUAD_START, REF_END, REF_START

CONVENTIONS = (BOX_TOKENS_1000, BOX_JSON_ABSOLUTE, BOX_JSON_1000)
OBJECT_REF_START, OBJECT_REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
FAMILY_BOX_START, FAMILY_BOX_END = "<|box_start|>", "<|box_end|>"
FAMILY_RANGE = 1000  # Qwen2-VL and Qwen3-VL relative coordinates run 0..1000 inclusive

_COORDS = r"\((\d+),(\d+)\),\((\d+),(\d+)\)"
_LABEL = rf"((?:(?!{re.escape(REF_END)}).)*?)"  # a ref's text: anything up to its own </ref>
# One grounding group of our text: an optional <ref>label</ref> and one or more boxes after it.
_GROUP = re.compile(
    rf"(?:{re.escape(REF_START)}{_LABEL}{re.escape(REF_END)})?"
    rf"((?:{re.escape(BOX_START)}{_COORDS}{re.escape(BOX_END)})+)",
    re.DOTALL,
)
_ONE_BOX = re.compile(rf"{re.escape(BOX_START)}{_COORDS}{re.escape(BOX_END)}")
_OPEN_BOX_PROMPT = re.compile(
    rf"{re.escape(REF_START)}{_LABEL}{re.escape(REF_END)}{re.escape(BOX_START)}\s*$", re.DOTALL
)
_BARE_REF = re.compile(rf"{re.escape(REF_START)}{_LABEL}{re.escape(REF_END)}", re.DOTALL)

_FAMILY_GROUP = re.compile(
    rf"(?:{re.escape(OBJECT_REF_START)}(.*?){re.escape(OBJECT_REF_END)})?"
    rf"((?:{re.escape(FAMILY_BOX_START)}\s*\(\s*-?[\d.]+\s*,\s*-?[\d.]+\s*\)\s*,\s*"
    rf"\(\s*-?[\d.]+\s*,\s*-?[\d.]+\s*\)\s*{re.escape(FAMILY_BOX_END)})+)",
    re.DOTALL,
)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_JSON_BOX = re.compile(
    r'"bbox_2d"\s*:\s*\[\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\]'
)
_JSON_LABEL = re.compile(r'"label"\s*:\s*("(?:[^"\\]|\\.)*")')

JSON_GROUNDING_PROMPT = "Locate {}, output its bbox coordinates using JSON format."


@dataclass(frozen=True)
class ImageGeometry:
    """An image's size as stored and as the model sees it (after the family's resize)."""

    width: int
    height: int
    resized_width: int
    resized_height: int


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown box convention {convention!r}; expected one of {', '.join(CONVENTIONS)}")


def _to_family_coords(
    box: tuple[int, int, int, int], convention: str, geometry: ImageGeometry | None
) -> list[int]:
    if convention != BOX_JSON_ABSOLUTE:
        return list(box)
    if geometry is None:
        raise ValueError("a box before any image: absolute coordinates need the image it refers to")
    sides = (geometry.resized_width, geometry.resized_height) * 2
    return [min(side - 1, round((c + 0.5) * side / COORD_RANGE)) for c, side in zip(box, sides)]


def _from_family_coords(
    coords: list[float], convention: str, geometry: ImageGeometry | None
) -> tuple[int, ...]:
    if convention == BOX_JSON_ABSOLUTE:
        if geometry is None:
            raise ValueError("absolute coordinates need the image they refer to")
        sides = (geometry.resized_width, geometry.resized_height) * 2
        values = [math.floor(c * COORD_RANGE / side) for c, side in zip(coords, sides)]
    else:
        values = [math.floor(c) for c in coords]
    return tuple(max(0, min(COORD_RANGE - 1, v)) for v in values)


def _json_item(label: str | None, coords: list[int]) -> str:
    item = {"bbox_2d": coords} if label is None else {"bbox_2d": coords, "label": label}
    return json.dumps(item, ensure_ascii=False)


def _format_group(
    label: str | None, boxes: list[tuple[int, int, int, int]], convention: str, geometry: ImageGeometry | None
) -> list[str]:
    """One group in the family's convention: the box-token text, or one JSON object per box."""
    if convention == BOX_TOKENS_1000:
        ref = "" if label is None else f"{OBJECT_REF_START}{label}{OBJECT_REF_END}"
        return [
            ref
            + "".join(
                f"{FAMILY_BOX_START}({x1},{y1}),({x2},{y2}){FAMILY_BOX_END}" for x1, y1, x2, y2 in boxes
            )
        ]
    return [_json_item(label, _to_family_coords(box, convention, geometry)) for box in boxes]


def boxes_to_family(text: str, convention: str, geometry: ImageGeometry | None = None) -> str:
    """Our ``<ref>``/``<box>`` text in the family's convention (module docstring). ``geometry``: the image
    the boxes refer to (needed by ``json_absolute`` only). ValueError on quads, which no family shares."""
    _check_convention(convention)
    if QUAD_START in text:
        raise ValueError(f"{QUAD_START} (OCR quads) has no equivalent in the {convention} box convention")
    prompt = _OPEN_BOX_PROMPT.search(text)
    if prompt is not None:
        label = prompt.group(1)
        request = (
            f"{OBJECT_REF_START}{label}{OBJECT_REF_END}"
            if convention == BOX_TOKENS_1000
            else JSON_GROUNDING_PROMPT.format(label)
        )
        text = text[: prompt.start()] + request
    groups = list(_GROUP.finditer(text))
    if not groups:
        return _rewrite_bare_refs(text, convention)
    rewritten = [
        _format_group(match.group(1), _boxes_of(match.group(2)), convention, geometry) for match in groups
    ]
    # The text before the first group, between consecutive groups, and after the last.
    around = (
        [text[: groups[0].start()]]
        + [text[a.end() : b.start()] for a, b in zip(groups, groups[1:])]
        + [text[groups[-1].end() :]]
    )
    if convention != BOX_TOKENS_1000 and not "".join(around).strip(" \n,.;"):
        items = [item for group in rewritten for item in group]  # the cookbooks' answer: one fenced JSON list
        return "```json\n[\n" + ",\n".join("\t" + item for item in items) + "\n]\n```"
    text = around[0] + "".join(", ".join(group) + after for group, after in zip(rewritten, around[1:]))
    return _rewrite_bare_refs(text, convention)


def _boxes_of(boxes_text: str) -> list[tuple[int, int, int, int]]:
    boxes = [tuple(int(g) for g in m.groups()) for m in _ONE_BOX.finditer(boxes_text)]
    for box in boxes:
        validate_box(list(box))
    return boxes


def _rewrite_bare_refs(text: str, convention: str) -> str:
    """A ``<ref>`` without a box: Qwen2-VL's object-reference tokens, plain text in the JSON conventions."""
    if convention == BOX_TOKENS_1000:
        return _BARE_REF.sub(lambda m: f"{OBJECT_REF_START}{m.group(1)}{OBJECT_REF_END}", text)
    return _BARE_REF.sub(lambda m: m.group(1), text)


def boxes_from_family(
    text: str, convention: str, geometry: ImageGeometry | None = None
) -> list[tuple[str | None, tuple[int, int, int, int]]]:
    """(label or None, box in our [0, 1000) convention) of every box in a family's answer, in order.
    Coordinates outside the image are clamped into it; a box whose corners are swapped is put in order."""
    _check_convention(convention)
    found = []
    if convention == BOX_TOKENS_1000:
        for match in _FAMILY_GROUP.finditer(text):
            numbers = [float(n) for n in _NUMBER.findall(match.group(2))]
            for i in range(0, len(numbers) - 3, 4):
                found.append(
                    (match.group(1), _ordered(_from_family_coords(numbers[i : i + 4], convention, None)))
                )
        return found
    for match in _JSON_BOX.finditer(text):
        # The label may come before or after bbox_2d inside the same {...}; JSON objects here do not nest.
        obj_start, obj_end = text.rfind("{", 0, match.start()), text.find("}", match.end())
        obj = text[max(obj_start, 0) : obj_end if obj_end >= 0 else len(text)]
        label_match = _JSON_LABEL.search(obj)
        label = json.loads(label_match.group(1)) if label_match else None
        coords = [float(g) for g in match.groups()]
        found.append((label, _ordered(_from_family_coords(coords, convention, geometry))))
    return found


def _ordered(box: tuple[int, ...]) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = box
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def family_answer_to_qwen_vl(text: str, convention: str, geometry: ImageGeometry | None = None) -> str:
    """A family's answer as our ``<ref>l</ref><box>(x1,y1),(x2,y2)</box>`` text (one per box, in order), for
    the metrics and chat drawing written for Qwen-VL answers. An answer without boxes is returned as it is."""
    boxes = boxes_from_family(text, convention, geometry)
    if not boxes:
        return text
    return "".join(
        ("" if label is None else f"{REF_START}{label}{REF_END}")
        + f"{BOX_START}({x1},{y1}),({x2},{y2}){BOX_END}"
        for label, (x1, y1, x2, y2) in boxes
    )
