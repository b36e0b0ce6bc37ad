"""Loaders for the data files users bring; every record comes out as a plain dict of one of three kinds:

* chat: ``{"conversations": [{"from": "system"|"user"|"assistant", "value": str}, ...]}`` (Qwen-VL
  fine-tune JSON list or JSONL; LLaVA-style ``human``/``gpt`` + ``<image>`` + ``image`` converted on load);
* preference pair (DPO):
  ``{"conversations": [... ending with the user turn], "chosen": str, "rejected": str}`` from
  ``{"conversations", "chosen": {"from": "assistant"|"gpt", "value"}, "rejected": {...}}``, Qwen-VL or LLaVA
  style (the answers may also be plain strings);
* task: ``{"task": ..., "image": ..., ...}`` (multitask records, data.templates) or a pretraining pair
  ``{"image", "caption"}`` (JSONL/CSV/Parquet through Hugging Face ``datasets``, optionally streamed).

Image paths are resolved against ``image_root`` when given, else against the data file's folder.
Errors name the file and the record index (JSON list) or line number (JSONL).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from data.chatml import ROLES, validate_conversation
from data.templates import task_of, task_prompt_and_target
from data.text import parse_boxes, split_image_spans
from models.errors import MissingFileError, UserError
from models.tokens import IMG_END, IMG_START

FORMATS = ("auto", "qwen", "llava", "multitask", "pretrain")
LLAVA_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "user": "user",
    "assistant": "assistant",
}
LLAVA_IMAGE = "<image>"
JSON_DEPTH = sys.getrecursionlimit()  # about the deepest nesting json.load reads before RecursionError
_IMG_SPAN = re.compile(re.escape(IMG_START) + r"(.*?)" + re.escape(IMG_END), re.DOTALL)


class DataFormatError(UserError):
    """Bad input, with the file and record named in the message."""


class ImageCountError(ValueError):
    """A LLaVA record whose ``<image>`` placeholders and ``image`` list differ in number."""


def resolve_path(path: str, base_dir: Path) -> str:
    """Absolute paths stay; relative ones are joined to base_dir (the data file's folder or image_root)."""
    if "://" in path:
        raise ValueError(f"image URLs are not supported (download the images first): {path}")
    p = Path(path)
    return str(p if p.is_absolute() else base_dir / p)


def _resolve_text_images(text: str, base_dir: Path) -> str:
    return _IMG_SPAN.sub(lambda m: f"{IMG_START}{resolve_path(m.group(1).strip(), base_dir)}{IMG_END}", text)


def type_name(value: object) -> str:
    """How a JSON value is named in an error: its JSON type (a record's values are never printed whole: they
    may be huge or nested thousands deep)."""
    names = {
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        list: "a list",
        dict: "an object",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def check_turns(record: dict, roles: dict[str, str] | tuple[str, ...]) -> list[dict]:
    """The record's ``conversations``, checked for shape: a list of objects, each with a ``from`` among
    ``roles`` and a string ``value``. ValueError naming the turn and the field otherwise: the loaders below
    then read the turns without meeting a wrong type."""
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise ValueError(f"'conversations' must be a list of turns, got {type_name(turns)}")
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {j} must be an object with 'from' and 'value', got {type_name(turn)}")
        for key in ("from", "value"):
            if key not in turn:
                raise ValueError(f"turn {j} has no {key!r}")
        if not isinstance(turn["from"], str) or turn["from"] not in roles:
            shown = repr(turn["from"]) if isinstance(turn["from"], str) else type_name(turn["from"])
            raise ValueError(f"turn {j} has role {shown}; allowed roles are {', '.join(roles)}")
        if not isinstance(turn["value"], str):
            raise ValueError(f"turn {j}: 'value' must be a string, got {type_name(turn['value'])}")
    return turns


def llava_to_qwen(record: dict) -> dict:
    """A LLaVA record (``image`` str or list, ``<image>`` placeholders, human/gpt roles) -> a chat record.

    Each ``<image>`` is replaced by ``<img>path</img>`` in order; when the text has no placeholder, the
    images are put in front of the first user turn (LLaVA's convention for single-image data).
    """
    images = record.get("image", [])
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ValueError(f"'image' must be a path or a list of paths, got {type_name(record['image'])}")
    turns = [{"from": LLAVA_ROLES[t["from"]], "value": t["value"]} for t in check_turns(record, LLAVA_ROLES)]
    placeholders = sum(t["value"].count(LLAVA_IMAGE) for t in turns)
    if placeholders and placeholders != len(images):
        raise ImageCountError(f"{placeholders} {LLAVA_IMAGE} placeholders but {len(images)} images")
    queue = iter(images)
    for t in turns:
        while LLAVA_IMAGE in t["value"]:
            t["value"] = t["value"].replace(LLAVA_IMAGE, f"{IMG_START}{next(queue)}{IMG_END}", 1)
    if images and not placeholders:
        first_user = next((t for t in turns if t["from"] == "user"), None)
        if first_user is None:
            raise ValueError("LLaVA record has images but no user turn")
        first_user["value"] = "".join(f"{IMG_START}{p}{IMG_END}\n" for p in images) + first_user["value"]
    out = {"conversations": turns}
    if "id" in record:
        out["id"] = record["id"]
    return out


def _is_llava(record: dict) -> bool:
    convs = record.get("conversations")
    if not isinstance(convs, list):
        return False  # not a chat record's shape: check_turns names the field
    return any(isinstance(t, dict) and t.get("from") in ("human", "gpt") for t in convs) or (
        "image" in record
        and any(LLAVA_IMAGE in str(t.get("value", "")) for t in convs if isinstance(t, dict))
    )


PREFERENCE_KEYS = ("chosen", "rejected")


def is_preference(record: dict) -> bool:
    """A preference pair (DPO data): the record has a 'chosen' or 'rejected' answer."""
    return any(key in record for key in PREFERENCE_KEYS)


def _answer_text(answer, key: str) -> str:
    """The text of a 'chosen'/'rejected' answer: ``{"from": "assistant"|"gpt", "value": str}`` or a string."""
    if isinstance(answer, dict):
        if answer.get("from") not in ("assistant", "gpt"):
            raise ValueError(
                f"'{key}' must come from 'assistant' (or LLaVA's 'gpt'), got {answer.get('from')!r}"
            )
        answer = answer.get("value")
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(
            f"'{key}' must be a non-empty answer text, got "
            + (repr(answer) if isinstance(answer, str) else type_name(answer))
        )
    if IMG_START in answer or LLAVA_IMAGE in answer:
        raise ValueError(f"'{key}' contains an image; images belong in the prompt, which both answers share")
    return answer


def _normalize_preference(record: dict, llava: bool, base_dir: Path) -> dict:
    """A preference pair: the prompt conversation (ending with the user turn the answers reply to) and two
    different answers. Validated like a chat record whose last turn is the chosen answer."""
    missing = [key for key in PREFERENCE_KEYS if key not in record]
    if missing:
        raise ValueError(
            f"preference record without '{missing[0]}' (a pair needs both 'chosen' and 'rejected')"
        )
    chosen, rejected = (_answer_text(record[key], key) for key in PREFERENCE_KEYS)
    if chosen == rejected:
        raise ValueError("'chosen' and 'rejected' are identical: the pair teaches nothing")
    prompt = {k: v for k, v in record.items() if k not in PREFERENCE_KEYS}
    if llava:
        prompt = llava_to_qwen(prompt)
    turns = prompt.get("conversations")
    if (
        not isinstance(turns, list)
        or not turns
        or not isinstance(turns[-1], dict)
        or turns[-1].get("from") != "user"
    ):
        raise ValueError(
            "a preference record's 'conversations' must end with the user turn the answers reply to"
        )
    chat = normalize_record(
        {"conversations": [*turns, {"from": "assistant", "value": chosen}]}, "qwen", base_dir
    )
    parse_boxes(rejected)  # malformed / out-of-range box -> ValueError
    out = {"conversations": chat["conversations"][:-1], "chosen": chosen, "rejected": rejected}
    if "id" in record:
        out["id"] = record["id"]
    return out


def detect_format(record: dict, fmt: str) -> str:
    """The format a record is read in: ``fmt`` itself, or for ``auto`` the record's own
    (qwen, llava, multitask)."""
    if fmt != "auto":
        return fmt
    return ("llava" if _is_llava(record) else "qwen") if "conversations" in record else "multitask"


def normalize_record(record: dict, fmt: str, base_dir: Path) -> dict:
    """Validate one raw record and return it in our chat, preference or task form with
    image paths resolved."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    fmt = detect_format(record, fmt)
    if fmt in ("qwen", "llava") and is_preference(record):
        return _normalize_preference(record, fmt == "llava", base_dir)
    if fmt == "llava":
        record, fmt = llava_to_qwen(record), "qwen"
    if fmt == "qwen":
        if "conversations" not in record:
            raise ValueError("a chat record needs a 'conversations' list")
        convs = check_turns(record, ROLES)
        validate_conversation(convs)  # the order of the turns
        turns = []
        for turn in convs:
            split_image_spans(turn["value"])  # unclosed / nested <img> -> ValueError
            parse_boxes(turn["value"])  # malformed / out-of-range box -> ValueError
            turns.append({"from": turn["from"], "value": _resolve_text_images(turn["value"], base_dir)})
        return {"conversations": turns}
    # multitask or pretrain: a task record
    if "messages" in record and "task" not in record:
        raise ValueError(
            "a 'messages' record (role/content turns) is not a format read here: write it as "
            "'conversations' of from/value turns (docs/data.md)"
        )
    out = dict(record)
    task_of(out)
    if "image" in out and out["image"] is not None:
        if not isinstance(out["image"], str):
            raise ValueError(f"'image' must be a path, got {type_name(out['image'])}")
        out["image"] = resolve_path(out["image"], base_dir)
    has_size = "width" in out and "height" in out
    needs_header = not has_size and (
        "bbox" in out or any(isinstance(t, dict) and "quad_px" in t for t in out.get("texts", []))
    )
    if not needs_header:  # validate fields and boxes now; pixel boxes without a size wait for the image
        task_prompt_and_target(out)
    return out


def empty_answer_turn(record: dict) -> int | None:
    """The index of the first assistant turn of a normalised chat record whose answer is empty (or only
    white space); None when every answer has text. Such a sample would teach the model to answer nothing:
    training skips it (counted as dropped_empty_answer, a warning line each time), data.check warns."""
    for j, turn in enumerate(record.get("conversations", ())):
        if turn["from"] == "assistant" and not turn["value"].strip():
            return j
    return None


def record_image_paths(record: dict) -> list[str]:
    """The image files a normalised record refers to (paths already resolved), in order."""
    if "conversations" in record:
        return [
            value
            for turn in record["conversations"]
            for kind, value in split_image_spans(turn["value"])
            if kind == "image"
        ]
    return [record["image"]] if record.get("image") is not None else []


def iter_json_records(
    path: Path, malformed: list[tuple[str, str]] | None = None
) -> Iterator[tuple[str, dict]]:
    """(where, raw record) from a JSON list (``.json``) or JSON lines (any other suffix).

    A malformed JSON line raises DataFormatError, or, when ``malformed`` is a list, is appended to it
    as (where, message) and skipped (the dataset check counts them).
    """
    with open(path, encoding="utf-8") as f:
        if path.suffix == ".json":
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataFormatError(
                    f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
                ) from e
            except UnicodeDecodeError as e:
                raise DataFormatError(f"{path}: not UTF-8 text (byte {e.start}); is it a JSON file?") from e
            except RecursionError:  # Python's JSON parser recurses once per level of [ or {
                raise DataFormatError(
                    f"{path}: JSON nested too deeply to read (over ~{JSON_DEPTH} levels of [ or {{)"
                ) from None
            if not isinstance(data, list):
                raise DataFormatError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
            for i, rec in enumerate(data):
                yield f"{path} record {i}", rec
            return
        lineno = 0
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path} line {lineno}"
                try:
                    rec = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as e:
                    message = (
                        f"malformed JSON: {e.msg} (column {e.colno})"
                        if isinstance(e, json.JSONDecodeError)
                        else f"JSON nested too deeply to read (over ~{JSON_DEPTH} levels of [ or {{)"
                    )
                    if malformed is None:
                        raise DataFormatError(f"{where}: {message}") from e
                    malformed.append((where, message))
                    continue
                yield where, rec
        except UnicodeDecodeError as e:
            raise DataFormatError(
                f"{path} line {lineno + 1}: not UTF-8 text; is it a JSON lines file?"
            ) from e


def load_records(
    path: str | Path, fmt: str = "auto", image_root: str | None = None
) -> tuple[list[dict], list[str]]:
    """All records of a JSON/JSONL file, validated and normalised; returns (records, where-strings).

    Raises DataFormatError naming the file and record/line on the first bad record.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise DataFormatError(f"{path}: unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise MissingFileError(f"data file not found: {path}")
    base_dir = Path(image_root) if image_root else path.parent
    records, wheres = [], []
    for where, raw in iter_raw_records(path, fmt):
        try:
            records.append(normalize_record(raw, fmt, base_dir))
        except (ValueError, KeyError, TypeError) as e:
            raise DataFormatError(f"{where}: {e}") from e
        wheres.append(where)
    return records, wheres


def iter_raw_records(
    path: str | Path, fmt: str = "auto", malformed: list[tuple[str, str]] | None = None
) -> Iterator[tuple[str, dict]]:
    """(where, raw record) of one data file, not yet validated: JSON/JSONL records, or the rows of a
    pretraining file (JSONL/CSV/Parquet through ``datasets``). ``malformed``: see iter_json_records."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if fmt == "pretrain":
        for i, row in enumerate(load_pretrain_pairs(path)):
            yield f"{path} row {i}", row
    else:
        yield from iter_json_records(path, malformed)


# --------------------------------------------------------------------- pretraining pairs via `datasets`

_HF_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _builder(path: Path) -> str:
    try:
        return _HF_BUILDERS[path.suffix]
    except KeyError:
        raise DataFormatError(
            f"{path}: pretraining pairs must be .jsonl/.json/.csv/.parquet "
            "(WebDataset .tar shards: data.format: webdataset)"
        ) from None


def load_pretrain_pairs(
    path: str | Path | list[str],
    streaming: bool = False,
    image_column: str = "image",
    caption_column: str = "caption",
):
    """(image, caption) pairs as a Hugging Face Dataset (or IterableDataset when streaming).

    ``path`` may be one file or a list of shards of one type; columns are renamed to image/caption.
    """
    import datasets  # imported lazily: only this format needs it

    files = [str(p) for p in ([path] if isinstance(path, (str, Path)) else path)]
    try:
        ds = datasets.load_dataset(
            _builder(Path(files[0])), data_files=files, split="train", streaming=streaming
        )
    except datasets.exceptions.DatasetGenerationError as e:  # the parser's own message is the cause's
        raise DataFormatError(
            f"{', '.join(files)}: cannot read the pretraining pairs: {e.__cause__ or e}"
        ) from e
    columns = ds.column_names if ds.column_names is not None else list(next(iter(ds)).keys())
    for col in (image_column, caption_column):
        if col not in columns:
            raise DataFormatError(f"{files[0]}: pretraining data needs a {col!r} column; found {columns}")
    renames = {c: n for c, n in ((image_column, "image"), (caption_column, "caption")) if c != n}
    return ds.rename_columns(renames) if renames else ds
