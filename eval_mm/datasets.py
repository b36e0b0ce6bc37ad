"""Benchmark files -> prompts the model answers (EvalSample) and references the metrics score against.

Formats are the reference's eval_mm data files (section 5). Every record error names the file and the
record index; a missing file names the expected path.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.formats import load_records
from data.text import split_image_spans
from eval_mm.benchmarks import Benchmark
from eval_mm.metrics.choice import MME_COGNITION, MME_PERCEPTION
from models.errors import MissingFileError, UserError

_ID_KEYS = ("question_id", "questionId", "id", "index")


@dataclass(frozen=True)
class EvalSample:
    id: str
    text: str  # prompt body; images written <img>path</img> with paths resolved
    options: tuple[str, ...] = ()  # option letters, for likelihood ranking
    record: dict | None = None  # a preference pair (data.formats form), for kind "preference"


class BenchmarkDataError(UserError):
    """A malformed benchmark file; the message names the file and the record."""


def require_file(path: Path, bench: str) -> Path:
    if not path.exists():  # a file, or MME's results directory
        raise MissingFileError(f"{bench}: data file not found: expected {path}")
    return path


def read_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BenchmarkDataError(f"{path} line {index + 1}: invalid JSON: {e}") from e
            except RecursionError:  # Python's JSON parser recurses once per level of [ or {
                raise BenchmarkDataError(f"{path} line {index + 1}: JSON nested too deeply to read") from None
    return records


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BenchmarkDataError(f"{path}: invalid JSON: {e}") from e
    except RecursionError:  # Python's JSON parser recurses once per level of [ or {
        raise BenchmarkDataError(f"{path}: JSON nested too deeply to read") from None


def _field(record: dict, key: str, path: Path, index: int) -> Any:
    if not isinstance(record, dict):
        raise BenchmarkDataError(
            f"{path} record {index}: expected a JSON object, got {type(record).__name__}"
        )
    if key not in record:
        raise BenchmarkDataError(f"{path} record {index}: missing field {key!r} (has {sorted(record)})")
    return record[key]


def record_id(record: dict, index: int) -> str:
    """The benchmark's own id when it has one, else the record index (ChartQA, AI2D, RefCOCO, ScienceQA)."""
    for key in _ID_KEYS:
        if key in record:
            return str(record[key])
    return str(index)


def _unique(ids: list[str], path: Path) -> None:
    seen: dict[str, int] = {}
    for index, sample_id in enumerate(ids):
        if sample_id in seen:
            raise BenchmarkDataError(
                f"{path} record {index}: duplicate id {sample_id!r} (first at record {seen[sample_id]})"
            )
        seen[sample_id] = index


def resolve_image(image: str, data_root: Path, data_file: Path, where: str) -> str:
    """Absolute path of an image named in a data file. Relative paths are tried against the data root,
    the data file's folder, and the data root's parent (the reference wrote paths as 'data/...')."""
    candidates = (
        [Path(image)]
        if Path(image).is_absolute()
        else [data_root / image, data_file.parent / image, data_root.parent / image]
    )
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    raise MissingFileError(f"{where}: image not found; tried {', '.join(map(str, candidates))}")


def _answers(value: Any) -> list[str]:
    return [str(a) for a in value] if isinstance(value, list) else [str(value)]


# ------------------------------------------------------------------------------------ samples


def load_samples(bench: Benchmark, data_root: str | Path) -> list[EvalSample]:
    root = Path(data_root).resolve()
    path = require_file(root / bench.test_file, bench.name)
    if bench.format == "coco_caption":
        data = read_json(path)
        samples = []
        for index, image in enumerate(_field(data, "images", path, 0)):
            where = f"{path} image record {index}"
            file = resolve_image(str(_field(image, "image", path, index)), root, path, where)
            samples.append(EvalSample(str(_field(image, "id", path, index)), bench.prompt.format(image=file)))
    elif bench.format == "preference_json":  # the training format, validated by the training loader
        records, _ = load_records(path, "auto")
        samples = [
            EvalSample(record_id(r, i), r["conversations"][-1]["value"], record=r)
            for i, r in enumerate(records)
        ]
    elif bench.format == "mme_dir":
        samples = [
            EvalSample(
                sample_id,
                bench.prompt.format(
                    image=resolve_image(
                        f"{path.parent}/images/{task}/{image}", root, path, f"{path}/{task}.txt line {line}"
                    ),
                    question=question,
                ),
            )
            for sample_id, (task, image, question, _gt, line) in _mme_records(path).items()
        ]
    else:
        samples = [
            _jsonl_sample(bench, record, index, root, path) for index, record in enumerate(read_jsonl(path))
        ]
    _unique([s.id for s in samples], path)
    return samples


def _jsonl_sample(bench: Benchmark, record: dict, index: int, root: Path, path: Path) -> EvalSample:
    where = f"{path} record {index}"
    sample_id = record_id(record, index)
    if bench.format == "seed_jsonl":
        prompt = str(_field(record, "prompt", path, index))
        return EvalSample(sample_id, _resolve_inline_images(prompt, root, path, where), ("A", "B", "C", "D"))
    image = resolve_image(str(_field(record, "image", path, index)), root, path, where)
    if bench.format == "vqa_jsonl":
        return EvalSample(
            sample_id, bench.prompt.format(image=image, question=_field(record, "question", path, index))
        )
    if bench.format == "grounding_jsonl":
        return EvalSample(
            sample_id, bench.prompt.format(image=image, sent=_field(record, "sent", path, index))
        )
    if bench.format == "choice_jsonl":
        choices = _field(record, "choices", path, index)
        if not isinstance(choices, list) or not 2 <= len(choices) <= 26:
            raise BenchmarkDataError(f"{where}: 'choices' must be a list of 2..26 options, got {choices!r}")
        letters = tuple(chr(ord("A") + i) for i in range(len(choices)))
        options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, choices, strict=True))
        hint = record.get("hint") or "N/A"  # the reference writes 'N/A' for an empty hint
        text = bench.prompt.format(
            image=image, hint=hint, question=_field(record, "question", path, index), options=options
        )
        return EvalSample(sample_id, text, letters)
    raise ValueError(
        f"{bench.name}: unknown record format {bench.format!r}"
    )  # a registry bug, not the user's


def _resolve_inline_images(text: str, root: Path, path: Path, where: str) -> str:
    pieces = split_image_spans(text)
    return "".join(
        value if kind == "text" else f"<img>{resolve_image(value, root, path, where)}</img>"
        for kind, value in pieces
    )


def _mme_records(results_dir: Path) -> dict[str, tuple[str, str, str, str, int]]:
    """MME's Your_Results/<task>.txt lines 'image<TAB>question<TAB>yes|no' -> id 'task/line'."""
    records = {}
    for task in MME_PERCEPTION + MME_COGNITION:
        file = require_file(results_dir / f"{task}.txt", "mme")
        for line_no, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 3:
                raise BenchmarkDataError(f"{file} line {line_no}: expected 'image<TAB>question<TAB>answer'")
            records[f"{task}/{line_no}"] = (task, parts[0], parts[1], parts[2].strip(), line_no)
    return records


# --------------------------------------------------------------------------------- references


def load_references(bench: Benchmark, path: str | Path) -> dict[str, Any]:
    """Ground truth keyed by sample id, in the shape bench.metric expects. `path` is the annotation
    file (bench.references_file under the data root, or the score CLI's --annotations)."""
    path = require_file(Path(path), bench.name)
    if bench.format == "coco_caption":
        data = read_json(path)
        refs: dict[str, Any] = {
            str(_field(img, "id", path, i)): [] for i, img in enumerate(_field(data, "images", path, 0))
        }
        for index, ann in enumerate(_field(data, "annotations", path, 0)):
            image_id = str(_field(ann, "image_id", path, index))
            if image_id not in refs:
                raise BenchmarkDataError(f"{path} annotation {index}: image_id {image_id} is not in 'images'")
            refs[image_id].append(str(_field(ann, "caption", path, index)))
        return refs
    if bench.format == "mme_dir":
        return {k: (task, image, gt) for k, (task, image, _q, gt, _line) in _mme_records(path).items()}
    if bench.format == "preference_json":  # the truth is in the pair itself: 'chosen' is the better answer
        return {record_id(r, i): "chosen" for i, r in enumerate(read_json(path))}
    if path.suffix == ".json":  # official VQA annotations or DocVQA/InfoVQA ground truth
        return _official_json_references(path)
    refs = {}
    for index, record in enumerate(read_jsonl(path)):
        where = f"{path} record {index}"
        if bench.format == "grounding_jsonl":
            ref = {key: _field(record, key, path, index) for key in ("bbox", "width", "height")}
            if len(ref["bbox"]) != 4:
                raise BenchmarkDataError(f"{where}: bbox must be [x1, y1, x2, y2], got {ref['bbox']!r}")
        elif bench.format in ("choice_jsonl", "seed_jsonl"):
            answer = _field(record, "answer", path, index)
            ref = chr(ord("A") + answer) if isinstance(answer, int) else str(answer).strip()
        else:
            ref = _answers(
                record["answers"] if "answers" in record else _field(record, "answer", path, index)
            )
        refs[record_id(record, index)] = ref
    _unique(list(refs), path)
    return refs


def _official_json_references(path: Path) -> dict[str, list[str]]:
    data = read_json(path)
    if (
        isinstance(data, dict) and "annotations" in data
    ):  # VQA: {"annotations": [{question_id, answers: [{answer}]}]}
        return {
            str(_field(a, "question_id", path, i)): [str(x["answer"]) for x in _field(a, "answers", path, i)]
            for i, a in enumerate(data["annotations"])
        }
    if isinstance(data, dict) and "data" in data:  # DocVQA / InfoVQA: {"data": [{questionId, answers}]}
        return {
            str(_field(q, "questionId", path, i)): _answers(_field(q, "answers", path, i))
            for i, q in enumerate(data["data"])
        }
    raise BenchmarkDataError(f"{path}: expected an official VQA ('annotations') or DocVQA ('data') JSON file")
