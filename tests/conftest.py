"""Shared test fixtures: a tiny in-memory tokenizer, a tiny seeded VLM and tiny `qwen.tiktoken` vocabularies
(no downloads, CPU, seconds); and the one way a test reaches the released Qwen vocabulary."""

from __future__ import annotations

import base64
import os
import random
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# A few hundred words of plain English so the byte-level BPE learns real merges. Captions, questions
# and answers like the ones the data pipeline produces.
_CORPUS = """
A photo of a dog running on the beach near the water. Two people are sitting on a bench in the park.
A red car is parked next to a white building with large windows. The cat sleeps on a wooden table.
What color is the bus? The bus is yellow. How many birds are in the sky? There are three birds.
Describe the image in English: a man is riding a bicycle down a busy street in the city at night.
A woman holds an umbrella while walking in the rain. Children play football on a green field.
Question: Is there a clock on the wall? Answer: yes. Question: What is the boy eating? Answer: an apple.
The kitchen has a stove, a sink, a refrigerator and a small window above the counter.
A plate of food with rice, vegetables and chicken sits on the table next to a glass of water.
The train arrives at the station while people wait on the platform with their bags.
A large brown bear walks through the tall grass near the river in the forest.
Picture 1: a group of friends smiling at the camera. Picture 2: a mountain covered with snow.
Generate the caption in English with grounding: the man in the blue shirt is holding a phone.
An airplane flies over the ocean under a clear blue sky. Boats float in the harbour at sunset.
The girl wears a pink dress and carries a basket of flowers through the garden.
A computer, a keyboard and a mouse are on the desk in the office beside a cup of coffee.
Which animal is larger, the horse or the sheep? The horse is larger than the sheep.
You are a helpful assistant. The user asks a question about the picture and the assistant answers.
Read the text in the image. The sign says stop. The street name is Main Street.
Context: plants need light and water to grow. Options: A. sand B. light C. metal. Answer: B
""".strip()


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab ~ 600) with every special token the VLM uses."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from models.tokens import ENDOFTEXT, VLM_SPECIAL_TOKENS

    special = [ENDOFTEXT, *VLM_SPECIAL_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        extra_special_tokens=list(VLM_SPECIAL_TOKENS),
    )


TINY_NUM_RANKS = 256 + 7  # write_tiny_tiktoken: 256 single bytes + a few merges


def write_tiny_tiktoken(path: Path) -> None:
    """The qwen.tiktoken layout: 256 single bytes as ranks 0-255 in a permuted order, then merges. "\\n\\n" is
    one token, as in the released vocabulary: a newline opening a turn joins the one before it."""
    order = list(range(256))
    random.Random(0).shuffle(order)
    tokens = [bytes([b]) for b in order] + [b"th", b"the", b" the", b"in", b"ing", b"\xe5\x9b", b"\n\n"]
    assert len(tokens) == TINY_NUM_RANKS
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))


@pytest.fixture(scope="session")
def tiny_tiktoken(tmp_path_factory) -> Path:
    """A tiny `qwen.tiktoken` (write_tiny_tiktoken): what the HF-family tests build their tokenizers from."""
    path = tmp_path_factory.mktemp("tiny_vocab") / "qwen.tiktoken"
    write_tiny_tiktoken(path)
    return path


# The released vocabulary (Qwen-VL-Chat's qwen.tiktoken), for the few tests about it: the copy kept in
# tests/assets/qwen_vl/ (see its README), or the file this variable names.
QWEN_TIKTOKEN_VARIABLE = "VLRECIPE_QWEN_TIKTOKEN"
SHIPPED_QWEN_TIKTOKEN = REPO_ROOT / "tests" / "assets" / "qwen_vl" / "qwen.tiktoken"


@pytest.fixture(scope="session")
def released_qwen_tiktoken() -> Path:
    """The released qwen.tiktoken: ${VLRECIPE_QWEN_TIKTOKEN}, else the copy in tests/assets/qwen_vl/; the
    test is skipped, saying so, where that file is absent."""
    path = Path(os.environ.get(QWEN_TIKTOKEN_VARIABLE) or SHIPPED_QWEN_TIKTOKEN)
    if not path.is_file():
        pytest.skip(
            f"needs the released Qwen vocabulary: {path} not found (set {QWEN_TIKTOKEN_VARIABLE} to "
            "a copy of Qwen-VL-Chat's qwen.tiktoken)"
        )
    return path


def single_process_engine(model, recipe):
    """The trainer's Engine for ``recipe`` in one CPU process: the recipe's optimiser (the ViT's depth for its
    layer decay), a 10-step schedule, and the recipe's parallel, train and clip settings."""
    from train.optim import build_optimizer, build_scheduler
    from train.parallel import DistInfo, Engine

    vit_blocks = model.config.vision.layers if hasattr(model, "vision") else 2
    optimizer = build_optimizer(model, recipe.optim, vit_blocks)
    scheduler = build_scheduler(optimizer, 10, recipe.optim.lr, recipe.schedule)
    return Engine(
        model,
        optimizer,
        scheduler,
        DistInfo(0, 1, 0, torch.device("cpu")),
        recipe.parallel,
        recipe.train,
        recipe.optim.clip_grad,
        offload_activations=recipe.perf.offload_activations,
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_vlm(tiny_tokenizer):
    """A tiny randomly initialised VLM (float32, CPU, eval mode). Treat as read-only; copy it to mutate."""
    from models import build_vlm, presets

    torch.manual_seed(0)
    model = build_vlm(presets.tiny(vocab_size=len(tiny_tokenizer)), tokenizer=tiny_tokenizer)
    return model.eval()


def packed_batches(model, tok, widths, seed=0):
    """Packed rows of samples (one image each) whose total length differs from batch to batch."""
    from data.packing import pack
    from models.tokens import image_token_ids

    gen = torch.Generator().manual_seed(seed)
    ids = image_token_ids(tok)
    span = [ids.start] + [ids.pad] * model.config.num_image_tokens + [ids.end]
    special = set(tok.all_special_ids) | {ids.start, ids.end, ids.pad}
    vocab = torch.tensor([i for i in range(len(tok)) if i not in special])
    batches = []
    for lengths in widths:
        samples = []
        for n in lengths:
            text = vocab[torch.randint(0, len(vocab), (n,), generator=gen)].tolist()
            row = torch.tensor(text[:3] + span + text[3:])
            labels = row.clone()
            labels[: 3 + len(span)] = -100
            samples.append({"input_ids": row, "labels": labels})
        batch = pack(samples, max_len=sum(len(s["input_ids"]) for s in samples), pad_id=0)
        batch["pixel_values"] = torch.randn(len(lengths), 3, 84, 84, generator=gen)
        batches.append(batch)
    return batches


_opened_files: list[str] = []


def _record_opens(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened_files.append(os.fsdecode(args[0]))


sys.addaudithook(_record_opens)  # an audit hook stays for the whole process; this one only appends to a list


@pytest.fixture
def opened_files() -> list[str]:
    """Every file this process (a server it runs included) tries to open during the test: Python's "open"
    audit event, raised before the file system is asked, so a missing file is listed too."""
    _opened_files.clear()
    return _opened_files
