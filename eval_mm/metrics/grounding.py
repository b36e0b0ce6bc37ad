"""Referring-expression grounding: parse the first box of the output, rescale, IoU >= 0.5."""

import re

_BOX_PATTERN = re.compile(r"\((.*?)\),\((.*?)\)")


def parse_first_box(text: str) -> tuple[float, float, float, float] | None:
    """First `(x1,y1),(x2,y2)` in `text` (the reference's regex), or None when it cannot be parsed."""
    match = _BOX_PATTERN.search(text)
    if match is None:
        return None
    try:
        x1, y1 = (float(v) for v in match.group(1).split(","))
        x2, y2 = (float(v) for v in match.group(2).split(","))
    except ValueError:  # not exactly two numbers in a group
        return None
    return x1, y1, x2, y2


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """IoU of two xyxy boxes. An inverted box (x2 < x1) has zero area, so it never counts as a hit."""

    def area(box):
        return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])

    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def grounding_hit(
    output: str,
    gt_box: list[float],
    width: float,
    height: float,
    box_divisor: float = 1000.0,
    iou_threshold: float = 0.5,
) -> tuple[bool, bool]:
    """(is_correct, was_parsable). Coordinates in text are in [0, 1000) (docs/design.md); mapping back
    is x / box_divisor * width (the reference's RefCOCO evaluator used 999)."""
    box = parse_first_box(output)
    if box is None:
        return False, False
    x1, y1, x2, y2 = box
    pixel_box = (
        x1 / box_divisor * width,
        y1 / box_divisor * height,
        x2 / box_divisor * width,
        y2 / box_divisor * height,
    )
    return box_iou(pixel_box, tuple(gt_box)) >= iou_threshold, True
