"""Raw (non-ChatML) task templates for pretraining and multitask records (reference 2.4 and 5.x prompts).

A task record renders as ``prompt + target + <|endoftext|>``; only ``target + <|endoftext|>`` is
supervised. Prompt and target are tokenised separately so the boundary the evaluator generates from
is a token boundary. The templates are the evaluators' prompts (eval_mm uses the same strings); every
prompt (the text task has none) starts with the image, ``<img>p</img>``, then:

| task | prompt after ``<img>p</img>`` | target |
|---|---|---|
| caption | ``Describe the image in English:`` | `` {caption}`` |
| vqa | ``{question} Answer:`` | `` {answer}`` |
| grounding | ``<ref>{ref}</ref><box>`` | ``(x1,y1),(x2,y2)</box>`` |
| referring | ``Describe the region <box>(x1,y1),(x2,y2)</box> in English:`` | `` {ref}`` |
| grounded_caption | ``Generate the caption in English with grounding:`` | `` {caption with <ref>/<box>}`` |
| ocr | ``OCR with grounding:`` | `` <ref>{text}</ref><quad>(x,y)x4</quad>...`` |
| choice | ``Context: {hint}\nQuestion: {question}\nOptions: A. ..\nB. ..\nAnswer:`` | `` {letter}`` |
| text | (none) | ``{text}`` |
"""

from __future__ import annotations

from data.image_files import image_size_of
from data.sample import IGNORE_INDEX, TokenizedSample, mask_first_label
from data.text import (
    BoxError,
    encode_text_with_images,
    format_box,
    format_points,
    normalize_box,
    normalize_coord,
    parse_boxes,
    validate_box,
)
from models.tokens import (
    BOX_END,
    BOX_START,
    ENDOFTEXT,
    IMG_END,
    IMG_START,
    QUAD_END,
    QUAD_START,
    REF_END,
    REF_START,
)

TASKS = ("caption", "vqa", "grounding", "referring", "grounded_caption", "ocr", "choice", "text")

CAPTION_PROMPT = "Describe the image in English:"
GROUNDED_CAPTION_PROMPT = "Generate the caption in English with grounding:"
OCR_PROMPT = "OCR with grounding:"


# The JSON type each task field must have when present (a wrong one would render as its repr, or fail
# deep in the template): (accepted types, how the error names them).
FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    **{key: ((str,), "a string") for key in ("image", "caption", "question", "ref", "text", "hint")},
    "answer": ((str, int, float), "a string or a number"),
    **{key: ((list,), "a list") for key in ("choices", "texts", "box", "bbox")},
    **{key: ((int, float), "a number") for key in ("width", "height")},
}


def _require(record: dict, *keys: str) -> None:
    """ValueError unless the record has every one of ``keys``; and every field it has of FIELD_TYPES (the
    required ones and the optional ones alike) is of its type."""
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"task {record.get('task')!r} needs field(s) {missing}")
    for key, (types, named) in FIELD_TYPES.items():
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            raise ValueError(f"field {key!r} must be {named}, got {type(value).__name__}")


def task_of(record: dict) -> str:
    """The record's task; a record without 'task' but with image + caption is a pretraining caption pair."""
    task = record.get("task")
    if task is None and "caption" in record and "image" in record:
        return "caption"
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return task


def record_box(record: dict) -> tuple[int, int, int, int]:
    """The record's box in [0, 1000): ``box`` (already normalised, validated) or ``bbox`` in pixels
    (xyxy) normalised with ``width``/``height`` from the record or the image header."""
    if "box" in record:
        box = [int(c) if isinstance(c, float) and c.is_integer() else c for c in record["box"]]
        validate_box(box)
        return tuple(box)
    _require(record, "bbox")
    width, height = record.get("width"), record.get("height")
    if width is None or height is None:
        width, height = image_size_of(record["image"])
    box = normalize_box(record["bbox"], width, height)
    validate_box(list(box))
    return box


def _quad_text(item: dict, width: float | None, height: float | None) -> str:
    if not isinstance(item, dict) or not isinstance(item.get("text"), str):
        raise ValueError(
            "each of an ocr record's 'texts' must be an object with a string 'text' and a "
            "'quad' or 'quad_px' of 4 points"
        )
    if "quad" in item:
        points = [tuple(p) for p in item["quad"]]
    else:  # quad_px: pixel points, normalised like boxes
        points = [(normalize_coord(x, width), normalize_coord(y, height)) for x, y in item["quad_px"]]
    if len(points) != 4:
        raise BoxError(f"a quad has 4 points, got {len(points)}")
    return f"{REF_START}{item['text']}{REF_END}{QUAD_START}{format_points(points)}{QUAD_END}"


def task_prompt_and_target(record: dict) -> tuple[str, str]:
    """The (prompt, target) strings of a multitask / pretraining record (see the module table)."""
    task = task_of(record)
    _require(record)  # the types of the fields present
    if task == "text":
        _require(record, "text")
        return "", record["text"]
    _require(record, "image")
    image = f"{IMG_START}{record['image']}{IMG_END}"
    if task == "caption":
        _require(record, "caption")
        return image + CAPTION_PROMPT, " " + record["caption"]
    if task == "vqa":
        _require(record, "question", "answer")
        return f"{image}{record['question']} Answer:", " " + str(record["answer"])
    if task == "grounding":
        _require(record, "ref")
        x1, y1, x2, y2 = record_box(record)
        return f"{image}{REF_START}{record['ref']}{REF_END}{BOX_START}", f"({x1},{y1}),({x2},{y2}){BOX_END}"
    if task == "referring":
        _require(record, "ref")
        return f"{image}Describe the region {format_box(record_box(record))} in English:", " " + record["ref"]
    if task == "grounded_caption":
        _require(record, "caption")
        parse_boxes(record["caption"])  # validates every box in the caption
        return image + GROUNDED_CAPTION_PROMPT, " " + record["caption"]
    if task == "choice":  # the multiple-choice evaluator's prompt (reference 5.3); answer = option index
        _require(record, "question", "choices", "answer")
        choices, answer = record["choices"], record["answer"]
        if not 2 <= len(choices) <= 26 or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"choice needs 2..26 choices and an answer index into them, got {answer!r}")
        options = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))
        hint = record.get("hint") or "N/A"
        return (
            f"{image}Context: {hint}\nQuestion: {record['question']}\nOptions: {options}\nAnswer:",
            " " + chr(65 + answer),
        )
    # ocr
    _require(record, "texts")
    width, height = record.get("width"), record.get("height")
    needs_size = any(not isinstance(t, dict) or "quad" not in t for t in record["texts"])
    if needs_size and (width is None or height is None):
        width, height = image_size_of(record["image"])
    return image + OCR_PROMPT, " " + "".join(_quad_text(t, width, height) for t in record["texts"])


def render_task(tokenizer, record: dict, num_image_tokens: int) -> TokenizedSample:
    """Tokenise a task record: prompt (labels -100) + target + <|endoftext|> (supervised)."""
    prompt, target = task_prompt_and_target(record)
    prompt_ids, paths = encode_text_with_images(tokenizer, prompt, num_image_tokens)
    target_ids, target_paths = encode_text_with_images(tokenizer, target, num_image_tokens)
    if target_paths:
        raise ValueError("images are not allowed in a task's target text")
    eos = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    ids = prompt_ids + target_ids + [eos]
    labels = [IGNORE_INDEX] * len(prompt_ids) + target_ids + [eos]
    return mask_first_label(TokenizedSample(ids, labels, paths))
