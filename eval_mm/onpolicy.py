"""On-policy preference pairs: the rejected answer is the model's own wrong answer.

    python -m eval_mm.onpolicy --checkpoint RUN/final --pairs dpo.json --out dpo_onpolicy.json
        [--right drop|keep] [--iou 0.5] [--batch-size 32] [--max-new-tokens N] [--device auto]

Multimodal DPO pipelines (RLHF-V, LLaVA-RLHF, POVID) take the rejected answers from the model being
trained, so that the pairs contrast the right answer with the mistakes this model actually makes. This tool
does it for a preference file whose ``chosen`` answers are right (the synthetic world's, data/synthetic.py,
or any such file): it asks the model each pair's question (greedy decoding, ChatML, as ``eval_mm`` does),
judges the answer against ``chosen``, and writes

- a wrong answer: the pair with ``rejected`` = the model's answer (and ``"rejected_source": "model"``);
- a right answer: nothing with ``--right drop`` (the default: only the model's mistakes), or the input pair
  unchanged with ``--right keep``; likewise an answer that cannot be rejected (empty, or one the training
  loader would refuse: a malformed box, an image tag).

Right means: for a ``chosen`` answer holding a box, a box in the answer whose IoU with the first box of
``chosen`` is at least ``--iou`` (two boxes of the same object seldom match digit for digit); otherwise the
same text up to case, surrounding white space and a final full stop. Records keep their id, conversation and
``chosen``; relative image paths (``<img>`` tags, a LLaVA record's ``image``) are rewritten relative to the
output's folder when it differs from the input's. Prints how many answers were right, wrong or unusable, by
kind of answer (box / text).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch

from data.chatml import encode_conversation_prompt
from data.formats import iter_raw_records, load_records, normalize_record
from data.images import load_image
from data.text import tokenize_plain
from eval_mm.inference import generate_tokens, left_pad, pad_token_id, stop_token_ids
from eval_mm.metrics.grounding import box_iou, parse_first_box
from models.errors import ArgumentParser, UserError, positive_int, run_cli
from models.loading import load_pretrained, pick_device

RIGHT_MODES = ("drop", "keep")
_IMG = re.compile(r"<img>(.*?)</img>", re.DOTALL)


def _plain(text: str) -> str:
    return text.strip().rstrip(".").strip().casefold()


def is_right(answer: str, chosen: str, iou: float = 0.5) -> bool:
    """Whether a generated answer says what ``chosen`` says (module docstring: boxes by IoU, else text)."""
    truth = parse_first_box(chosen)
    if truth is None:
        return _plain(answer) == _plain(chosen)
    box = parse_first_box(answer)
    return box is not None and box_iou(box, truth) >= iou


def answer_kind(chosen: str) -> str:
    return "box" if parse_first_box(chosen) is not None else "text"


def relocate_path(path: str, source_dir: Path, out_dir: Path) -> str:
    """An image path relative to ``source_dir`` made relative to ``out_dir``; absolute paths stay."""
    if Path(path).is_absolute() or source_dir.resolve() == out_dir.resolve():
        return path
    return os.path.relpath(source_dir.resolve() / path, out_dir.resolve())


def relocate_images(text: str, source_dir: Path, out_dir: Path) -> str:
    """``text`` with the path of each ``<img>`` tag relocated (``relocate_path``)."""
    return _IMG.sub(lambda m: f"<img>{relocate_path(m.group(1), source_dir, out_dir)}</img>", text)


def relocate_record(record: dict, source_dir: Path, out_dir: Path) -> None:
    """Relocate, in place, every image path of a raw Qwen-VL or LLaVA record."""
    for turn in record["conversations"]:
        turn["value"] = relocate_images(turn["value"], source_dir, out_dir)
    image = record.get("image")
    if isinstance(image, str):
        record["image"] = relocate_path(image, source_dir, out_dir)
    elif isinstance(image, list):
        record["image"] = [relocate_path(p, source_dir, out_dir) for p in image]


@torch.no_grad()
def generate_for_pairs(
    model,
    tokenizer,
    records: list[dict],
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    wheres: list[str] | None = None,
) -> list[str]:
    """The model's greedy ChatML answer to each preference record's conversation (records as
    ``data.formats.load_records`` gives them: image paths resolved; ``wheres`` name them in errors).
    ``max_new_tokens`` None: the longest ``chosen`` answer's token count plus 8, so a wrong answer of the same
    form is never cut short."""
    config = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenize_plain(tokenizer, r["chosen"])) for r in records) + 8
    stop_ids = stop_token_ids(tokenizer, "chatml")
    # Longest prompt first: batches of similar length, little padding (as eval_mm's runner orders them).
    encoded = [
        encode_conversation_prompt(tokenizer, r["conversations"], config.num_image_tokens) for r in records
    ]
    order = sorted(range(len(records)), key=lambda i: -len(encoded[i][0]))
    answers: list[str] = [""] * len(records)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        input_ids, attention_mask = left_pad([encoded[i][0] for i in chunk], pad_token_id(tokenizer))
        images = [
            load_image(p, config.vision.image_size, where=wheres[i] if wheres else f"pair {i}")
            for i in chunk
            for p in encoded[i][1]
        ]
        pixels = (
            torch.stack(images)
            if images
            else torch.zeros(0, 3, config.vision.image_size, config.vision.image_size)
        )
        new = generate_tokens(
            model,
            input_ids.to(device),
            attention_mask.to(device),
            pixels.to(device, dtype),
            max_new_tokens=max_new_tokens,
            min_new_tokens=1,
            stop_ids=stop_ids,
        )
        for i, row in zip(chunk, new.tolist(), strict=True):
            answers[i] = decode_answer(tokenizer, row, stop_ids)
    return answers


def decode_answer(tokenizer, tokens: list[int], stop_ids: list[int]) -> str:
    """The answer's text up to its first stop token, special tokens kept: a rejected answer must be the text
    the model wrote, ``<ref>``/``<box>`` tags included (eval_mm drops them; its metrics read only the words
    and the coordinates)."""
    stops = set(stop_ids)
    end = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
    return tokenizer.decode(tokens[:end], skip_special_tokens=False).strip()


def _trainable(record: dict, answer: str) -> bool:
    """Whether the pair with ``answer`` rejected passes the training loader's validation (data.formats)."""
    if "<img>" in answer or "</img>" in answer:
        return False
    try:
        normalize_record(
            {
                "conversations": [{"from": "user", "value": "q"}],
                "chosen": record["chosen"],
                "rejected": answer,
            },
            "qwen",
            Path("."),
        )
    except (ValueError, KeyError, TypeError):
        return False
    return True


def onpolicy_pairs(
    raw: list[dict],
    answers: list[str],
    right: str = "drop",
    iou: float = 0.5,
    source_dir: Path | None = None,
    out_dir: Path | None = None,
) -> tuple[list[dict], Counter]:
    """The output records from the input's raw records and the model's answers; and counts
    ``(kind, "right"|"wrong"|"unusable")`` per kind of answer."""
    if right not in RIGHT_MODES:
        raise ValueError(f"right must be one of {RIGHT_MODES}, got {right!r}")
    out, counts = [], Counter()
    for record, answer in zip(raw, answers, strict=True):
        chosen = record["chosen"]["value"] if isinstance(record["chosen"], dict) else record["chosen"]
        kind = answer_kind(chosen)
        if answer and is_right(answer, chosen, iou):
            counts[kind, "right"] += 1
            verdict = "right"
        elif answer and _trainable(record, answer):
            counts[kind, "wrong"] += 1
            verdict = "wrong"
        else:
            # Nothing to reject (an empty answer), or an answer training would refuse (a malformed box, an
            # image tag): the pair is treated as answered right.
            counts[kind, "unusable"] += 1
            verdict = "right"
        if verdict == "right" and right == "drop":
            continue
        new = json.loads(json.dumps(record))  # a deep copy, as JSON
        if source_dir is not None and out_dir is not None:
            relocate_record(new, source_dir, out_dir)
        if verdict == "wrong":
            rejected = new["rejected"]
            if isinstance(rejected, dict):
                rejected["value"] = answer
            else:
                new["rejected"] = answer
            new["rejected_source"] = "model"
        out.append(new)
    return out, counts


def main(argv: list[str] | None = None, prog: str = "python -m eval_mm.onpolicy") -> None:
    p = ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        examples=[
            "--checkpoint runs/demo/sft/final --pairs "
            "runs/demo/data/synthetic/dpo.json --out runs/dpo_onpolicy.json"
        ],
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="the model whose answers are rejected: any export "
        "(models.load_pretrained), normally the SFT run's final/",
    )
    p.add_argument(
        "--pairs", required=True, help="preference pairs whose 'chosen' answers are right (JSON / JSONL)"
    )
    p.add_argument("--out", required=True, help="output JSON file")
    p.add_argument(
        "--right",
        choices=RIGHT_MODES,
        default="drop",
        help="pairs the model answers right: drop them (default) or keep them unchanged",
    )
    p.add_argument(
        "--iou", type=float, default=0.5, help="a box answer is right at this IoU with chosen's box"
    )
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        help="default: the longest chosen answer's tokens + 8",
    )
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda")
    p.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    a = p.parse_args(argv)
    if not 0.0 < a.iou <= 1.0:
        p.error(f"argument --iou: must be in (0, 1], got {a.iou}")

    pairs, out = Path(a.pairs), Path(a.out)
    records, wheres = load_records(pairs, "auto")  # validated; the bad record is named
    for record, where in zip(records, wheres, strict=True):
        if "chosen" not in record:
            raise UserError(f"{where}: not a preference pair (no 'chosen' answer)")
    raw = [record for _, record in iter_raw_records(pairs)]  # as written: relative image paths kept
    if not records:
        raise UserError(f"{pairs}: no preference pairs")
    model, tokenizer = load_pretrained(a.checkpoint, device=pick_device(a.device))
    answers = generate_for_pairs(model, tokenizer, records, a.batch_size, a.max_new_tokens, wheres)
    result, counts = onpolicy_pairs(raw, answers, a.right, a.iou, pairs.parent, out.parent)
    if not result:
        raise UserError(f"{pairs}: the model answers every pair right; no on-policy pair to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    for kind in sorted({k for k, _ in counts}):
        print(
            f"{kind:4s} answers: {counts[kind, 'right']} right, {counts[kind, 'wrong']} wrong, "
            f"{counts[kind, 'unusable']} unusable (empty or malformed)"
        )
    print(
        f"wrote {len(result)} pairs "
        f"({sum(v for (_, s), v in counts.items() if s == 'wrong')} with the model's "
        f"answer rejected) to {out}"
    )


if __name__ == "__main__":
    run_cli(main)
