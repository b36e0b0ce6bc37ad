"""Special tokens of the Qwen-VL sequence layout and helpers to make a tokenizer carry them.

An image is written in the token stream as ``<img>`` + N x ``<imgpad>`` + ``</img>``; boxes and
referring expressions use ``<ref>``/``<box>``/``<quad>``; chat turns use ChatML markers.
"""

from __future__ import annotations

from dataclasses import dataclass

IMG_START = "<img>"
IMG_END = "</img>"
IMG_PAD = "<imgpad>"
REF_START, REF_END = "<ref>", "</ref>"
BOX_START, BOX_END = "<box>", "</box>"
QUAD_START, QUAD_END = "<quad>", "</quad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"  # pad / eos when the tokenizer has none of its own

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # one of them makes a directory a tokenizer's

# The tokens every VLM tokenizer must know (order = the order they are appended when missing).
VLM_SPECIAL_TOKENS: tuple[str, ...] = (
    IMG_START,
    IMG_END,
    IMG_PAD,
    REF_START,
    REF_END,
    BOX_START,
    BOX_END,
    QUAD_START,
    QUAD_END,
    IM_START,
    IM_END,
)


@dataclass(frozen=True)
class ImageTokenIds:
    start: int  # <img>
    end: int  # </img>
    pad: int  # <imgpad>: the slots the resampler outputs overwrite


def _known(tokenizer, token: str) -> bool:
    return token in tokenizer.get_vocab()


def ensure_special_tokens(tokenizer) -> list[str]:
    """Add the VLM special tokens the tokenizer lacks; return the ones added (in order).

    Tokens are added as special (never split by BPE, not normalised). If the tokenizer has no pad
    token, ``<|endoftext|>`` becomes the pad token (and the eos token when there is none either).
    The caller must resize the model's embeddings when the returned list is non-empty
    (``models.build_vlm`` does).
    """
    added = [t for t in VLM_SPECIAL_TOKENS if not _known(tokenizer, t)]
    if added:
        tokenizer.add_special_tokens({"extra_special_tokens": added}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        if not _known(tokenizer, ENDOFTEXT):
            added.append(ENDOFTEXT)
        tokenizer.add_special_tokens({"pad_token": ENDOFTEXT})
        if tokenizer.eos_token is None:
            tokenizer.add_special_tokens({"eos_token": ENDOFTEXT})
    return added


def image_token_ids(tokenizer) -> ImageTokenIds:
    """The ids of ``<img>``, ``</img>``, ``<imgpad>``; ValueError if the tokenizer lacks one."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (IMG_START, IMG_END, IMG_PAD) if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks {missing}; call models.tokens.ensure_special_tokens first")
    return ImageTokenIds(start=vocab[IMG_START], end=vocab[IMG_END], pad=vocab[IMG_PAD])
