"""A small synthetic multimodal world a tiny model can learn on a CPU in minutes.

    python -m data.synthetic --out DIR --seed S [--n-train 2000 --n-eval 1000 --image-size 112] [--webdataset]

Images are 1-3 big coloured shapes, each in its own quadrant, or one rendered word, on a light
background. Few colours, few shapes, fixed phrasing: what a tiny model can learn quickly, so training
shows clear gains in captioning, VQA and grounding. Everything is a pure function of the seed (two
runs write identical bytes). Files (all paths inside are relative to DIR, the files' folder):

  images/{train,eval}/NNNNNN.png
  pretrain.jsonl           {image, caption}                       pretraining pairs
  webdataset/pretrain-NNNNNN.tar  the same pairs as WebDataset shards (--webdataset): KEY.png, KEY.txt,
                           KEY.json {caption, image}; the manifest names them by a brace pattern
  multitask.jsonl          {task, image, ...}                     data.templates records
  sft.json                 Qwen-VL fine-tune JSON (multi-turn, some with 2 pictures, <ref>/<box> answers)
  dpo.json                 preference pairs {conversations, chosen, rejected}, every count / colour / box
                           question of each picture: the right answer against a plausible wrong one (DPO)
  dpo_count_color.json     its count and colour pairs (the demo's DPO stage: box pairs need a model that binds
                           a shape to its place)
  caption_test.json        COCO format {images[{id, image}], annotations[{id, image_id, caption}]}
  vqa_test.jsonl           {image, question, question_id, answer, answers (10)}
  vqa_test_annotations.json  VQAv2-style {annotations[{question_id, answers[{answer, answer_id}], ...}]}
  grounding_test.jsonl     RefCOCO-style {image, sent, bbox (xyxy px), width, height}
  mc_test.jsonl            ScienceQA-style {image, hint, question, choices, answer (index)}
  dpo_test.json            held-out preference pairs, likewise (eval_mm's synth_preference)
  tokenizer/               byte-level BPE trained on all the text above, with the VLM special tokens
  manifest.json            every file with its kind, format and record count
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from data.chatml import DEFAULT_SYSTEM_MESSAGE
from data.templates import task_prompt_and_target
from data.text import format_box, normalize_box, normalize_coord
from data.webdataset import shard_pattern, write_shards
from models.errors import ArgumentParser, UserError, positive_int, run_cli
from models.tokens import ENDOFTEXT, VLM_SPECIAL_TOKENS

COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 190, 20)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("cat", "dog", "sun", "box", "map", "sky", "car", "hat")
BACKGROUNDS = ((255, 255, 255), (225, 225, 225), (245, 235, 215), (215, 232, 245))
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # quadrants, in reading order
NUMBERS = ("zero", "one", "two", "three")


@dataclass
class Thing:
    """An object in an image: a shape or a word, with its pixel box (x1, y1, x2, y2)."""

    color: str
    kind: str  # a shape name, or "word"
    box: tuple[int, int, int, int]
    position: str = ""
    word: str = ""

    @property
    def name(self) -> str:
        return f"the word {self.word}" if self.kind == "word" else f"the {self.color} {self.kind}"


def draw_shapes(rng: random.Random, size: int) -> tuple[Image.Image, list[Thing]]:
    img = Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(img)
    cells = sorted(rng.sample(range(4), rng.randint(1, 3)))
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], len(cells))  # unique (colour, shape) pairs
    things = []
    half = size / 2
    for cell, (color, shape) in zip(cells, kinds, strict=True):
        d = rng.uniform(0.34, 0.42) * size
        slack = (half - d) / 2
        cx = (cell % 2) * half + half / 2 + rng.uniform(-slack, slack)
        cy = (cell // 2) * half + half / 2 + rng.uniform(-slack, slack)
        x1, y1, x2, y2 = round(cx - d / 2), round(cy - d / 2), round(cx + d / 2), round(cy + d / 2)
        fill = COLORS[color]
        if shape == "circle":
            draw.ellipse((x1, y1, x2, y2), fill=fill)
        elif shape == "square":
            draw.rectangle((x1, y1, x2, y2), fill=fill)
        else:
            draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill)
        things.append(Thing(color, shape, (x1, y1, x2, y2), POSITIONS[cell]))
    return img, things


def draw_word(rng: random.Random, size: int, font: ImageFont.FreeTypeFont) -> tuple[Image.Image, list[Thing]]:
    img = Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(img)
    word, color = rng.choice(WORDS), rng.choice(list(COLORS))
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    x = rng.uniform(2, size - (right - left) - 2) - left
    y = rng.uniform(2, size - (bottom - top) - 2) - top
    draw.text((x, y), word, font=font, fill=COLORS[color])
    box = tuple(round(v) for v in draw.textbbox((x, y), word, font=font))
    return img, [Thing(color, "word", box, word=word)]


def caption(things: list[Thing]) -> str:
    if things[0].kind == "word":
        return f"the word {things[0].word}."
    parts = [f"a {t.color} {t.kind}" for t in things]
    return (parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]) + "."


def questions(things: list[Thing]) -> list[tuple[str, str, str]]:
    """(question, answer, type) pairs answerable from the image."""
    if things[0].kind == "word":
        t = things[0]
        return [("What word is written?", t.word, "text"), ("What color is the word?", t.color, "color")]
    qs = [("How many shapes are there?", str(len(things)), "count")]
    for t in things:
        if sum(o.kind == t.kind for o in things) == 1:
            qs.append((f"What color is the {t.kind}?", t.color, "color"))
        if sum(o.color == t.color for o in things) == 1:
            qs.append((f"What shape is the {t.color} object?", t.kind, "shape"))
        qs.append((f"Where is the {t.color} {t.kind}?", t.position, "position"))
    return qs


def grounded_caption(things: list[Thing], size: int) -> str:
    if things[0].kind == "word":
        t = things[0]
        return f"<ref>the word {t.word}</ref>{format_box(normalize_box(t.box, size, size))}."
    parts = [f"a <ref>{t.color} {t.kind}</ref>{format_box(normalize_box(t.box, size, size))}" for t in things]
    return (parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]) + "."


def choice_question(rng: random.Random, things: list[Thing]) -> dict:
    question, answer, qtype = rng.choice(
        [q for q in questions(things) if q[2] in ("color", "shape", "text", "count")]
    )
    pool = {"color": list(COLORS), "shape": list(SHAPES), "text": list(WORDS), "count": ["1", "2", "3"]}[
        qtype
    ]
    choices = rng.sample([c for c in pool if c != answer], min(3, len(pool) - 1)) + [answer]
    rng.shuffle(choices)
    return {"hint": "", "question": question, "choices": choices, "answer": choices.index(answer)}


@dataclass
class World:
    seed: int
    image_size: int = 112
    text_fraction: float = 0.25

    def draw(self, rng: random.Random, font) -> tuple[Image.Image, list[Thing]]:
        if rng.random() < self.text_fraction:
            return draw_word(rng, self.image_size, font)
        return draw_shapes(rng, self.image_size)


def task_records(rng: random.Random, image: str, things: list[Thing], size: int) -> list[dict]:
    """All multitask records of one training image."""
    recs = [{"task": "caption", "image": image, "caption": caption(things)}]
    recs += [{"task": "vqa", "image": image, "question": q, "answer": a} for q, a, _ in questions(things)]
    for t in things:
        recs.append(
            {
                "task": "grounding",
                "image": image,
                "ref": t.name,
                "bbox": list(t.box),
                "width": size,
                "height": size,
            }
        )
    t = rng.choice(things)
    recs.append(
        {
            "task": "referring",
            "image": image,
            "ref": t.name,
            "bbox": list(t.box),
            "width": size,
            "height": size,
        }
    )
    recs.append({"task": "grounded_caption", "image": image, "caption": grounded_caption(things, size)})
    if things[0].kind == "word":
        quad = [
            (x, y)
            for x, y in (
                (t.box[0], t.box[1]),
                (t.box[2], t.box[1]),
                (t.box[2], t.box[3]),
                (t.box[0], t.box[3]),
            )
        ]
        recs.append(
            {
                "task": "ocr",
                "image": image,
                "texts": [
                    {
                        "text": t.word,
                        "quad": [[normalize_coord(x, size), normalize_coord(y, size)] for x, y in quad],
                    }
                ],
            }
        )
    recs.append({"task": "choice", "image": image, **choice_question(rng, things)})
    return recs


def conversation(rng: random.Random, images: list[tuple[str, list[Thing]]], size: int) -> dict:
    """A multi-turn Qwen-VL fine-tune conversation about one or two pictures.

    One-picture conversations mix chat phrasing ("Find X and give its box.") with the task phrasing
    of the pretraining templates and evaluators ("Describe the image in English:", "... Answer:",
    "<ref>X</ref><box>"), as Qwen-VL's SFT data does, so the chat model answers either way.
    """
    if len(images) == 2:
        header = "".join(f"Picture {i + 1}: <img>{p}</img>\n" for i, (p, _) in enumerate(images))
        n = rng.randrange(2)
        turns = [(f"{header}Describe picture {n + 1}.", caption(images[n][1]))]
        q, a, _ = rng.choice(questions(images[1 - n][1]))
        turns.append((f"In picture {2 - n}: {q}", a))
    else:
        path, things = images[0]
        task_phrasing = rng.random() < 0.5
        turns = [
            ("Describe the image in English:" if task_phrasing else "Describe the image.", caption(things))
        ]
        qs = rng.sample(questions(things), min(2, len(questions(things))))
        turns += [(f"{q} Answer:" if task_phrasing else q, a) for q, a, _ in qs]
        t = rng.choice(things)
        box = format_box(normalize_box(t.box, size, size))
        turns.append(
            (
                f"<ref>{t.name}</ref><box>" if task_phrasing else f"Find {t.name} and give its box.",
                f"<ref>{t.name}</ref>{box}",
            )
        )
        rng.shuffle(turns)
        header = f"<img>{path}</img>" if task_phrasing else f"Picture 1: <img>{path}</img>\n"
        turns[0] = (header + turns[0][0], turns[0][1])
    convs = []
    for user, assistant in turns:
        convs += [{"from": "user", "value": user}, {"from": "assistant", "value": assistant}]
    return {"conversations": convs}


def moved_box(box: tuple[int, int, int, int], size: int) -> tuple[int, int, int, int]:
    """A box of the same size in the opposite corner of the image (another quadrant)."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    nx = 0 if x1 + x2 > size else size - w
    ny = 0 if y1 + y2 > size else size - h
    return (nx, ny, nx + w, ny + h)


def preference_pairs(rng: random.Random, path: str, things: list[Thing], size: int) -> list[dict]:
    """The preference records of one picture: every question of three kinds it answers, each with its right
    answer (chosen) and a plausible wrong one (rejected): the number of shapes against another count, the
    colour of each object named by its kind (a shape kind that repeats would be ambiguous) against another
    colour (one in the picture when there is one), and the box of each object against the box of another
    object in the picture (else the right box moved to the opposite corner). Every question rather than one
    drawn per picture: DPO sees every contrast a picture offers, and the held-out pairs number several per
    image (3,700-3,800 for 1,000 images), which narrows the noise of the preference accuracy. Rejected answers
    are drawn so that no answer is rejected more often than it is right: a model cannot win pairs by avoiding
    an answer without looking at the picture. Each record is phrased like the SFT conversations, chat or
    task style."""
    pairs = []  # (kind, question, right, wrong, thing)
    if things[0].kind != "word":
        n = len(things)
        # Any other count, not the nearest: pictures hold 1-3 shapes, and "off by one" would make "2" the
        # rejected answer of two pairs in three, which a model learns to avoid without looking at the picture.
        wrong = rng.choice([m for m in (1, 2, 3) if m != n])
        pairs.append(("count", "How many shapes are there?", str(n), str(wrong), None))
    for t in things:
        if t.kind == "word" or sum(o.kind == t.kind for o in things) == 1:
            question = "What color is the word?" if t.kind == "word" else f"What color is the {t.kind}?"
            seen = [o.color for o in things if o.color != t.color]
            pairs.append(
                ("color", question, t.color, rng.choice(seen or [c for c in COLORS if c != t.color]), t)
            )
    for t in things:
        others = [o for o in things if o is not t]
        wrong_box = rng.choice(others).box if others else moved_box(t.box, size)
        right, wrong = (
            f"<ref>{t.name}</ref>{format_box(normalize_box(box, size, size))}" for box in (t.box, wrong_box)
        )
        pairs.append(("box", "", right, wrong, t))
    records = []
    for kind, question, right, wrong, t in pairs:
        task_phrasing = rng.random() < 0.5
        if kind == "box":
            question = f"<ref>{t.name}</ref><box>" if task_phrasing else f"Find {t.name} and give its box."
        elif task_phrasing:
            question += " Answer:"
        header = f"<img>{path}</img>" if task_phrasing else f"Picture 1: <img>{path}</img>\n"
        records.append(
            {
                "conversations": [{"from": "user", "value": header + question}],
                "chosen": {"from": "assistant", "value": right},
                "rejected": {"from": "assistant", "value": wrong},
            }
        )
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def render_images(world: World, out: Path, split: str, n: int) -> list[tuple[str, list[Thing]]]:
    """Draw and save n images; returns (path relative to out, things) per image."""
    rng = random.Random(f"{world.seed}/{split}/images")  # str seeds hash with sha512: stable across runs
    font = ImageFont.load_default(size=max(8, round(world.image_size * 0.3)))
    folder = out / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        img, things = world.draw(rng, font)
        rel = f"images/{split}/{i:06d}.png"
        img.save(out / rel, format="PNG", optimize=False)
        items.append((rel, things))
    return items


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int) -> None:
    """Byte-level BPE on the world's text, with pad/eos <|endoftext|> and every VLM special token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT, *VLM_SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        extra_special_tokens=list(VLM_SPECIAL_TOKENS),
    ).save_pretrained(out_dir)


def write_pretrain_shards(out: Path, pretrain: list[dict], shard_size: int) -> str:
    """The pretraining pairs as WebDataset shards in ``out/webdataset``; returns their brace pattern
    relative to ``out``."""
    samples = (
        {
            "__key__": Path(p["image"]).stem,
            "png": (out / p["image"]).read_bytes(),
            "txt": p["caption"].encode(),
            "json": json.dumps(p).encode(),
        }
        for p in pretrain
    )
    paths = write_shards(samples, out / "webdataset", "pretrain", shard_size)
    return str(Path(shard_pattern(paths)).relative_to(out))


def generate(
    out: str | Path,
    seed: int = 0,
    n_train: int = 2000,
    n_eval: int = 1000,
    image_size: int = 112,
    vocab_size: int = 1024,
    text_fraction: float = 0.25,
    webdataset_shard_size: int | None = None,
) -> dict:
    """Write the whole world to ``out``; returns the manifest. ``webdataset_shard_size``: also write the
    pretraining pairs as WebDataset shards of that many samples."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = World(seed, image_size, text_fraction)
    size = image_size
    train = render_images(world, out, "train", n_train)
    evals = render_images(world, out, "eval", n_eval)
    rng = random.Random(f"{seed}/records")

    pretrain = [{"image": p, "caption": caption(things)} for p, things in train]
    multitask = [r for p, things in train for r in task_records(rng, p, things, size)]
    sft = []
    for i, item in enumerate(train):
        pair = [item, train[rng.randrange(n_train)]] if rng.random() < 0.1 else [item]
        sft.append({"id": f"synthetic_{i}", **conversation(rng, pair, size)})

    caption_test = {
        "info": {"description": f"synthetic world, seed {seed}"},
        "licenses": [],
        "type": "captions",
        "images": [{"id": i, "image": p} for i, (p, _) in enumerate(evals)],
        "annotations": [{"id": i, "image_id": i, "caption": caption(t)} for i, (_, t) in enumerate(evals)],
    }
    vqa_test, vqa_ann = [], []
    for i, (p, things) in enumerate(evals):
        q, a, qtype = rng.choice(questions(things))
        vqa_test.append({"image": p, "question": q, "question_id": i, "answer": a, "answers": [a] * 10})
        vqa_ann.append(
            {
                "question_id": i,
                "image_id": i,
                "question_type": qtype,
                "answer_type": "other",
                "multiple_choice_answer": a,
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)],
            }
        )
    grounding_test = []
    for p, things in evals:
        t = rng.choice(things)
        grounding_test.append(
            {"image": p, "sent": t.name, "bbox": list(t.box), "width": size, "height": size}
        )
    mc_test = [{"image": p, **choice_question(rng, things)} for p, things in evals]
    dpo_rng = random.Random(f"{seed}/preference")  # its own stream: the other files stay as they were
    dpo = [
        {"id": f"dpo_{i}_{k}", **pair}
        for i, (p, things) in enumerate(train)
        for k, pair in enumerate(preference_pairs(dpo_rng, p, things, size))
    ]
    dpo_test = [
        {"id": f"dpo_test_{i}_{k}", **pair}
        for i, (p, things) in enumerate(evals)
        for k, pair in enumerate(preference_pairs(dpo_rng, p, things, size))
    ]
    # What the demo's DPO stage trains on: the count and colour pairs. A box pair asks which of a picture's
    # shapes is where, which a model that does not bind a shape to its place cannot learn; DPO then only
    # moves the quadrant its boxes favour, and grounding with it (docs/training.md "DPO").
    dpo_count_color = [r for r in dpo if "<box>" not in r["chosen"]["value"]]

    files = {
        "pretrain": ("pretrain.jsonl", "train", "pretrain pairs {image, caption}", pretrain),
        "multitask": ("multitask.jsonl", "train", "multitask records (data.templates)", multitask),
        "sft": ("sft.json", "train", "Qwen-VL fine-tune JSON list", sft),
        "dpo": (
            "dpo.json",
            "train",
            "preference pairs {conversations, chosen, rejected} (Qwen-VL JSON)",
            dpo,
        ),
        "dpo_count_color": (
            "dpo_count_color.json",
            "train",
            "the count and colour pairs of dpo.json",
            dpo_count_color,
        ),
        "caption_test": ("caption_test.json", "eval", "COCO caption JSON", caption_test),
        "vqa_test": (
            "vqa_test.jsonl",
            "eval",
            "VQA JSONL {image, question, question_id, answer, answers}",
            vqa_test,
        ),
        "vqa_test_annotations": (
            "vqa_test_annotations.json",
            "eval",
            "VQAv2 annotations JSON",
            {"annotations": vqa_ann},
        ),
        "grounding_test": (
            "grounding_test.jsonl",
            "eval",
            "RefCOCO JSONL {image, sent, bbox xyxy px, width, height}",
            grounding_test,
        ),
        "mc_test": (
            "mc_test.jsonl",
            "eval",
            "multiple choice JSONL {image, hint, question, choices, answer}",
            mc_test,
        ),
        "dpo_test": ("dpo_test.json", "eval", "preference pairs {conversations, chosen, rejected}", dpo_test),
    }
    manifest = {
        "seed": seed,
        "image_size": size,
        "n_train_images": n_train,
        "n_eval_images": n_eval,
        "paths": "relative to this folder",
        "world": {
            "colors": list(COLORS),
            "shapes": list(SHAPES),
            "words": list(WORDS),
            "positions": list(POSITIONS),
        },
        "files": {},
    }
    for name, (file, split, fmt, data) in files.items():
        (write_jsonl if file.endswith(".jsonl") else write_json)(out / file, data)
        count = len(data) if isinstance(data, list) else len(data.get("images", data.get("annotations", [])))
        manifest["files"][name] = {"path": file, "split": split, "format": fmt, "count": count}

    if webdataset_shard_size:
        manifest["files"]["pretrain_webdataset"] = {
            "path": write_pretrain_shards(out, pretrain, webdataset_shard_size),
            "split": "train",
            "format": "WebDataset shards of the pretraining pairs (png, txt, json)",
            "count": len(pretrain),
        }

    texts = [DEFAULT_SYSTEM_MESSAGE, "system\nuser\nassistant\n"]
    texts += [
        " ".join(task_prompt_and_target(r)).replace(f"<img>{r['image']}</img>", "") for r in multitask[:20000]
    ]
    texts += [t["value"] for c in sft for t in c["conversations"]]
    train_tokenizer(texts, out / "tokenizer", vocab_size)
    manifest["files"]["tokenizer"] = {
        "path": "tokenizer",
        "split": "-",
        "format": "Hugging Face tokenizer dir",
        "count": vocab_size,
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def main(argv: list[str] | None = None, prog: str = "python -m data.synthetic") -> None:
    p = ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        examples=["--out runs/world --seed 0", "--out runs/world_small --seed 1 --n-train 200 --n-eval 50"],
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=positive_int, default=2000, help="training images")
    p.add_argument(
        "--n-eval",
        type=positive_int,
        default=1000,
        help="held-out evaluation images (1,000: a change of 2-3 points between two models stands "
        "clear of its paired standard error, python -m eval_mm compare; on 200 it does not)",
    )
    p.add_argument(
        "--image-size", type=positive_int, default=112, help="side of the square images in pixels (>= 16)"
    )
    p.add_argument(
        "--vocab-size", type=positive_int, default=1024, help="size of the BPE tokenizer trained on the text"
    )
    p.add_argument("--text-fraction", type=fraction, default=0.25, help="share of images showing a word")
    p.add_argument(
        "--webdataset", action="store_true", help="also write the pretraining pairs as WebDataset shards"
    )
    p.add_argument("--shard-size", type=positive_int, default=100, help="samples per WebDataset shard")
    p.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    a = p.parse_args(argv)
    if a.image_size < 16:
        p.error(f"argument --image-size: must be >= 16 (shapes and words need room), got {a.image_size}")
    out = Path(a.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the folder: {e.strerror or e}") from e
    m = generate(
        out,
        a.seed,
        a.n_train,
        a.n_eval,
        a.image_size,
        a.vocab_size,
        a.text_fraction,
        webdataset_shard_size=a.shard_size if a.webdataset else None,
    )
    for name, f in m["files"].items():
        print(f"{name:22s} {f['count']:7d}  {out / f['path']}")


if __name__ == "__main__":
    run_cli(main)
