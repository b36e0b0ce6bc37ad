"""What the dataset check looks for, and how it reads each kind of record.

Two tables, the only places to extend:

* ``PROBLEMS``: every problem kind, whether it is an error (counts towards the failure threshold)
  or a warning, and what it means;
* ``RECORD_KINDS``: for each kind of normalised record (data.formats), which task it counts under,
  which of its texts are scanned for tag problems, and which tokenised samples training makes of it.
  A new record kind adds one entry here and nothing elsewhere (preference pairs did).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from data.formats import ImageCountError, is_preference
from data.sample import TokenizedSample, truncate_pair
from data.templates import task_of, task_prompt_and_target
from data.text import BoxError, GroundingTagError, ImageTagError, check_grounding_tags
from models.tokens import IM_END, IM_START, IMG_PAD


@dataclass(frozen=True)
class Problem:
    kind: str
    error: bool  # True: counts towards --max-error-fraction; False: a warning
    meaning: str


PROBLEMS: dict[str, Problem] = {
    p.kind: p
    for p in (
        Problem(
            "invalid_record",
            True,
            "training refuses the record: malformed JSON, a bad role or field, an unknown "
            "task, an image whose size a pixel box needs that cannot be read",
        ),
        Problem("malformed_img_tag", True, "an <img> tag unclosed, nested, stray or without a path"),
        Problem(
            "image_count_mismatch", True, "<image> placeholders differ in number from the record's images"
        ),
        Problem(
            "bad_box",
            True,
            "a <box> or <quad> malformed, with coordinates outside [0, 1000) or corners out of order",
        ),
        Problem(
            "malformed_grounding_tag",
            True,
            "<ref>/<box>/<quad> tags unclosed, nested or stray (a prompt may end with an open <box>)",
        ),
        Problem(
            "control_token_in_text",
            True,
            f"text holds {IMG_PAD}, {IM_START} or {IM_END}: it would break the "
            "image slots or the ChatML turns",
        ),
        Problem(
            "no_supervised_tokens", True, "no token of the sample is supervised: it adds nothing to the loss"
        ),
        Problem(
            "dropped_too_long",
            True,
            "nothing supervised fits in max_len without cutting an image span: training drops the sample",
        ),
        # Found by the image part, counted by file, judged against data.max_bad_images (see report.py).
        Problem("missing_image", True, "an image file that does not exist"),
        Problem("undecodable_image", True, "an image file that cannot be decoded, or over the pixel cap"),
        Problem("truncated", False, "longer than max_len: training cuts it (never inside an image span)"),
        Problem(
            "image_span_cut",
            False,
            "max_len falls inside an image span: training drops that image and everything after it",
        ),
        Problem("duplicate", False, "the same tokens and images as an earlier sample"),
        Problem(
            "empty_answer",
            False,
            "an assistant answer is empty (or only white space): training skips the sample "
            "(counted as dropped_empty_answer)",
        ),
    )
}
IMAGE_PROBLEMS = ("missing_image", "undecodable_image")

# Tokens no record text may hold: the renderer places them, and a stray one shifts image slots or turns.
CONTROL_TOKENS = (IMG_PAD, IM_START, IM_END)


def classify(error: BaseException) -> str:
    """The problem kind of an exception raised while validating or tokenising a record."""
    # An image that had to be read to tokenise (pixel boxes without a size) and could not be: the record
    # cannot be rendered, and training stops on it, so it is an invalid record (ImageLoadError: the default).
    while error is not None:  # DataFormatError wraps the original exception (raise ... from e)
        for cls, kind in (
            (ImageTagError, "malformed_img_tag"),
            (BoxError, "bad_box"),
            (GroundingTagError, "malformed_grounding_tag"),
            (ImageCountError, "image_count_mismatch"),
        ):
            if isinstance(error, cls):
                return kind
        error = error.__cause__
    return "invalid_record"


def text_problems(text: str, is_prompt: bool) -> list[tuple[str, str]]:
    """(kind, message) of the tag problems in one text; a prompt may end with an open ``<box>``."""
    found = []
    try:
        check_grounding_tags(text, open_box_at_end=is_prompt)
    except (GroundingTagError, BoxError) as e:
        found.append((classify(e), str(e)))
    for token in CONTROL_TOKENS:
        if token in text:
            found.append(("control_token_in_text", f"text holds {token} at character {text.index(token)}"))
    return found


# ------------------------------------------------------------------------------------------ record kinds


@dataclass(frozen=True)
class RecordKind:
    """How the check reads one kind of normalised record (see the module docstring)."""

    name: str
    matches: Callable[[dict], bool]
    task: Callable[[dict], str]  # the row it counts under in "records by task"
    texts: Callable[[dict], list[tuple[str, bool]]]  # (text, is a prompt) scanned for tag problems
    # The samples training tokenises from the record, through data.dataset.SampleBuilder.
    samples: Callable[..., list[TokenizedSample]]


def _chat_texts(record: dict) -> list[tuple[str, bool]]:
    return [(turn["value"], turn["from"] != "assistant") for turn in record["conversations"]]


def _task_texts(record: dict) -> list[tuple[str, bool]]:
    # Prompt and target together: the grounding prompt's open <box> is closed by its target.
    return [("".join(task_prompt_and_target(record)), False)]


def _one_sample(builder, record: dict, where: str) -> list[TokenizedSample]:
    return [builder.tokenize(record, where)]


def _preference_texts(record: dict) -> list[tuple[str, bool]]:
    return _chat_texts(record) + [(record[key], False) for key in ("chosen", "rejected")]


def _pair_samples(builder, record: dict, where: str) -> list[TokenizedSample]:
    """Chosen and rejected, each one sample. A pair that max_len cuts through an image span of its prompt,
    or that keeps nothing of an answer, is refused by training (data.dataset ``build_pair``), not dropped:
    a ValueError here, so an invalid record with training's message."""
    chosen, rejected = builder.tokenize_pair(record, where)
    truncate_pair(chosen, rejected, builder.config.max_len, builder.img_start, builder.img_end)
    return [chosen, rejected]


RECORD_KINDS: tuple[RecordKind, ...] = (  # the first match wins: a preference pair has conversations too
    RecordKind("preference", is_preference, lambda r: "preference", _preference_texts, _pair_samples),
    RecordKind("chat", lambda r: "conversations" in r, lambda r: "chat", _chat_texts, _one_sample),
    RecordKind("task", lambda r: True, task_of, _task_texts, _one_sample),
)


def record_kind(record: dict) -> RecordKind:
    return next(kind for kind in RECORD_KINDS if kind.matches(record))
