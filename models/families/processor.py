"""A family's tokenizer and processor: built offline from `qwen.tiktoken`,
or loaded from a released directory.

The Qwen2 tokenizer family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) has the same 151,643 byte-level BPE tokens as
Qwen-VL's `qwen.tiktoken` (reference 2.2). Its `vocab.json` is the ranks written over GPT-2's byte-to-unicode
map, and its `merges.txt` has one merge per multi-byte token: the last merge of byte-pair encoding that
token with the ranks, in rank order. Both are derived here; their bytes equal the released files
(SHA-256 pinned by third parties for Qwen2.5-VL-7B-Instruct, checked in tests/test_model_families.py).
The added tokens (specs.QWEN2_ADDED_TOKENS) follow the ranks, as the release numbers them: 151643.. with the
released file. Any other ranks file (the tests' tiny one) gives the same tokenizer over its own vocabulary,
every added token included; a model for it takes its ids from it (``HFFamilyModel.from_preset(name,
tokenizer=...)``). eos is ``<|im_end|>`` as in the Instruct releases, and the chat template is the family's
own, byte for byte.

The image processor is transformers' ``Qwen2VLImageProcessor`` with the family's released defaults
(patch size, mean/std, min/max pixels); ``min_pixels``/``max_pixels`` override the pixel budget per image.
"""

from __future__ import annotations

import functools
from pathlib import Path

from transformers import AddedToken, AutoProcessor, ProcessorMixin, Qwen2Tokenizer, Qwen2VLImageProcessor
from transformers.convert_slow_tokenizer import bytes_to_unicode

from models.errors import MissingFileError, UserError
from models.families.specs import QWEN2_ADDED_TOKENS, FamilySpec
from models.qwen_tokenizer import read_tiktoken_ranks

IMAGE_MERGE_SIZE = 2  # 2x2 patches become one LLM token in every family


def _last_bpe_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair whose merge completes ``token`` when byte-pair encoding it with ``ranks`` (tiktoken's rule:
    repeatedly join the adjacent pair whose concatenation has the lowest rank). Written out because
    tiktoken is not a dependency and `tokenizers` has no merges to start from."""
    parts = [token[i : i + 1] for i in range(len(token))]
    last = None
    while len(parts) > 1:
        best_rank, best_at = None, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_at = rank, i
        if best_at is None:
            raise UserError(f"token {token!r} cannot be reached by merging its bytes; not a BPE ranks file")
        last = (parts[best_at], parts[best_at + 1])
        parts[best_at : best_at + 2] = [parts[best_at] + parts[best_at + 1]]
    return last


@functools.lru_cache(maxsize=2)
def qwen2_vocab_and_merges(tiktoken_path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab.json, merges.txt) of the Qwen2 tokenizer, from a `qwen.tiktoken` ranks file (cached: 2 s)."""
    ranks = read_tiktoken_ranks(tiktoken_path)
    byte_to_char = bytes_to_unicode()

    def to_chars(token: bytes) -> str:
        return "".join(byte_to_char[b] for b in token)

    in_rank_order = sorted(ranks, key=ranks.__getitem__)
    vocab = {to_chars(token): ranks[token] for token in in_rank_order}
    merges = [
        tuple(map(to_chars, _last_bpe_merge(token, ranks))) for token in in_rank_order if len(token) > 1
    ]
    return vocab, merges


def build_family_tokenizer(spec: FamilySpec, tiktoken_path: str | Path) -> Qwen2Tokenizer:
    """The family's tokenizer over the BPE tokens of a `qwen.tiktoken` ranks file, its added tokens right
    after them (no download). From the released file, the released tokenizer."""
    tiktoken_path = Path(tiktoken_path)
    if not tiktoken_path.is_file():
        raise MissingFileError(f"{tiktoken_path}: tiktoken ranks file not found")
    vocab, merges = qwen2_vocab_and_merges(str(tiktoken_path.resolve()))
    tokenizer = Qwen2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=None,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=spec.chat_template,
    )
    added = QWEN2_ADDED_TOKENS[: spec.num_added_tokens]
    tokenizer.add_tokens([AddedToken(token, special=special, normalized=False) for token, special in added])
    for offset, (token, _) in enumerate(added):  # only a ranks file holding the token itself can move it
        if tokenizer.convert_tokens_to_ids(token) != len(vocab) + offset:
            raise UserError(
                f"{tiktoken_path}: {token} did not land on id {len(vocab) + offset}, "
                f"right after the {len(vocab)} ranks"
            )
    tokenizer.eos_token = "<|im_end|>"  # the Instruct releases end a turn, and generation, with it
    return tokenizer


def build_image_processor(
    spec: FamilySpec, min_pixels: int | None = None, max_pixels: int | None = None
) -> Qwen2VLImageProcessor:
    """The family's image processor with its released defaults; ``min_pixels``/``max_pixels`` (the pixel
    budget per image, data.min_pixels / data.max_pixels) override them."""
    shortest = min_pixels if min_pixels is not None else spec.min_pixels
    longest = max_pixels if max_pixels is not None else spec.max_pixels
    if not 0 < shortest <= longest:
        raise UserError(f"min_pixels ({shortest}) must be positive and at most max_pixels ({longest})")
    return Qwen2VLImageProcessor(
        size={"shortest_edge": shortest, "longest_edge": longest},
        patch_size=spec.patch_size,
        temporal_patch_size=2,
        merge_size=IMAGE_MERGE_SIZE,
        image_mean=list(spec.image_mean),
        image_std=list(spec.image_std),
    )


def build_family_processor(
    spec: FamilySpec, tiktoken_path: str | Path, min_pixels: int | None = None, max_pixels: int | None = None
) -> ProcessorMixin:
    """The family's processor (``Qwen2_5_VLProcessor`` ...) as its release ships it, built offline. (The
    processor classes require a video processor; the recipe never feeds videos.)"""
    tokenizer = build_family_tokenizer(spec, tiktoken_path)
    image_processor = build_image_processor(spec, min_pixels, max_pixels)
    video_processor = spec.video_processor_class(
        patch_size=spec.patch_size,
        merge_size=IMAGE_MERGE_SIZE,
        image_mean=list(spec.image_mean),
        image_std=list(spec.image_std),
    )
    return spec.processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=spec.chat_template,
    )


def load_family_processor(
    path: str | Path, min_pixels: int | None = None, max_pixels: int | None = None
) -> ProcessorMixin:
    """The processor saved in a released (or exported) model directory, with an optional new pixel budget."""
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"{path}: model directory not found")
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=False)
    set_pixel_budget(processor, min_pixels, max_pixels)
    return processor


def set_pixel_budget(processor: ProcessorMixin, min_pixels: int | None, max_pixels: int | None) -> None:
    """Give the processor's image processor a new pixel budget per image (in place); None keeps a bound."""
    size = dict(processor.image_processor.size)
    shortest = min_pixels if min_pixels is not None else size["shortest_edge"]
    longest = max_pixels if max_pixels is not None else size["longest_edge"]
    if not 0 < shortest <= longest:
        raise UserError(f"min_pixels ({shortest}) must be positive and at most max_pixels ({longest})")
    processor.image_processor.size = {**size, "shortest_edge": shortest, "longest_edge": longest}
