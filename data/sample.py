"""A tokenised training sample and the span-safe truncation applied to it."""

from __future__ import annotations

from dataclasses import dataclass, field

IGNORE_INDEX = -100  # label value the loss skips (the reference's LabelSmoother.ignore_index)


@dataclass
class TokenizedSample:
    """One training sample before images are decoded: labels are aligned with input_ids (the model shifts)."""

    input_ids: list[int]
    labels: list[int]
    image_paths: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(
                f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) differ in length"
            )

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


def mask_first_label(sample: TokenizedSample) -> TokenizedSample:
    """Set the first label to -100 (design.md: in a packed row it would predict across the boundary)."""
    if sample.labels:
        sample.labels[0] = IGNORE_INDEX
    return sample


def mask_image_spans(ids: list[int], labels: list[int], img_start: int, img_end: int) -> None:
    """Set labels to -100 on every ``<img> ... </img>`` span, markers included (image slots are never
    supervised)."""
    inside = False
    for i, t in enumerate(ids):
        if t == img_start:
            inside = True
        if inside:
            labels[i] = IGNORE_INDEX
        if t == img_end:
            inside = False


def span_safe_cut(input_ids: list[int], max_len: int, img_start: int, img_end: int) -> tuple[int, int]:
    """Where a sample longer than max_len is cut, and how many images survive: ``(cut, kept_images)``.

    The cut is max_len, or just before the ``<img>`` whose span max_len falls into (a cut < max_len
    means an image span was in the way: that image and everything after it go).
    """
    kept_images, i = 0, 0
    while True:  # list.index scans in C: this runs once per image, not once per token
        try:
            i = input_ids.index(img_start, i, max_len)
        except ValueError:
            return max_len, kept_images
        try:
            end = input_ids.index(img_end, i)
        except ValueError:  # malformed; treat as split
            end = len(input_ids)
        if end >= max_len:
            return i, kept_images
        kept_images += 1
        i = end + 1


def truncate_span_safe(
    sample: TokenizedSample, max_len: int, img_start: int, img_end: int
) -> TokenizedSample | None:
    """Cut the sample to at most max_len tokens without ever cutting through an image span.

    If max_len falls inside ``<img> ... </img>``, the cut moves back to just before that ``<img>`` (the
    image and everything after it go). Images are kept only for the spans that survive. Returns None
    when nothing supervised survives: the caller drops the sample and counts it.
    """
    if len(sample) <= max_len:
        return sample
    cut, kept_images = span_safe_cut(sample.input_ids, max_len, img_start, img_end)
    labels = sample.labels[:cut]
    if labels.count(IGNORE_INDEX) == len(labels):
        return None
    return TokenizedSample(sample.input_ids[:cut], labels, sample.image_paths[:kept_images])


def _cut_falls_in_image_span(ids: list[int], cut: int, img_start: int, img_end: int) -> bool:
    """Whether keeping ``ids[:cut]`` would leave an ``<img>`` without its ``</img>``."""
    inside = False
    for t in ids[:cut]:
        if t == img_start:
            inside = True
        elif t == img_end:
            inside = False
    return inside


def truncate_pair(
    chosen: TokenizedSample, rejected: TokenizedSample, max_len: int, img_start: int, img_end: int
) -> tuple[TokenizedSample, TokenizedSample, bool]:
    """Cut each sequence of a preference pair to at most max_len tokens; returns
    (chosen, rejected, truncated).

    Only answers may be cut (their end goes, as TRL truncates completions). A cut that leaves nothing of
    an answer (the prompt alone fills max_len) or that falls inside an image span of the prompt is a
    ValueError: dropping half a pair, or training on half an image, would be silent damage.
    """
    out = []
    for name, sample in (("chosen", chosen), ("rejected", rejected)):
        cut = truncate_span_safe(sample, max_len, img_start, img_end)
        if cut is None:
            cut_image = _cut_falls_in_image_span(sample.input_ids, max_len, img_start, img_end)
            what = "cuts through an image span of the prompt" if cut_image else "leaves nothing of the answer"
            raise ValueError(
                f"the {name} sequence has {len(sample)} tokens and max_len={max_len} {what}; "
                "raise data.max_len or shorten the prompt"
            )
        out.append(cut)
    return out[0], out[1], len(out[0]) < len(chosen) or len(out[1]) < len(rejected)
