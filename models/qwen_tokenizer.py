"""Build a Hugging Face fast tokenizer from Qwen-VL's `qwen.tiktoken`, without trust_remote_code.

The released Qwen-VL(-Chat) tokenizer is a tiktoken BPE (remote code, `tokenization_qwen.py`). Its
vocabulary file `qwen.tiktoken` holds one `base64(token_bytes) rank` pair per line: 151,643 byte-level
BPE tokens, the first 256 ranks being the 256 single bytes in some order. Special tokens are not in
the file; the reference appends them after the last rank in a fixed order (see `QWEN_SPECIAL_TOKENS`).

We rebuild the same tokenizer with the `tokenizers` library: a byte-level BPE whose merges are
derived from the ranks, Qwen's pre-tokenisation regex, an NFC normaliser (the reference NFC-normalises
text before encoding) and the special tokens at the reference's ids. The embedding matrix keeps its
151,936 rows; ids 151,860..151,935 are unused padding rows that the tokenizer never produces.

Usage: `build_qwen_tokenizer("/path/to/qwen.tiktoken").save_pretrained(out_dir)`.

The inverse (models.export_qwenvl): `tiktoken_ranks_from_tokenizer(tokenizer)` recovers the ranks of a
tokenizer built this way, refusing one that no `qwen.tiktoken` can carry, and `write_tiktoken_ranks`
writes them in the release's exact format.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from models.errors import MissingFileError, UserError
from models.tokens import (
    BOX_END,
    BOX_START,
    ENDOFTEXT,
    IM_END,
    IM_START,
    IMG_END,
    IMG_PAD,
    IMG_START,
    QUAD_END,
    QUAD_START,
    REF_END,
    REF_START,
)

# tokenization_qwen.py's PAT_STR. Note the single `\p{N}` (one digit per piece; GPT-4's cl100k uses
# `\p{N}{1,3}`), so numbers are always split into single digits.
QWEN_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

NUM_EXTRA_TOKENS = 205
IMAGE_SPECIAL_TOKENS = (
    REF_START,
    REF_END,
    BOX_START,
    BOX_END,
    QUAD_START,
    QUAD_END,
    IMG_START,
    IMG_END,
    IMG_PAD,
)

# The reference's order: ids are len(ranks) + index in this tuple, i.e. 151643 <|endoftext|>,
# 151644/151645 <|im_start|>/<|im_end|>, 151646..151850 extras, 151851 <ref> ... 151859 <imgpad>.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    (ENDOFTEXT, IM_START, IM_END)
    + tuple(f"<|extra_{i}|>" for i in range(NUM_EXTRA_TOKENS))
    + IMAGE_SPECIAL_TOKENS
)

QWEN_NUM_RANKS = 151643  # lines in the released qwen.tiktoken
QWEN_EMBEDDING_ROWS = 151936  # rows of wte / lm_head in the released checkpoints (padded)
QWEN_MODEL_MAX_LENGTH = 8192  # tokenizer_config.json of the release

# ChatML, as the reference's make_context builds it (system prompt defaults to its
# "You are a helpful assistant.").
QWEN_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken ranks file (`base64(token) rank` per line) into {token_bytes: rank}.

    Ranks must be exactly 0..n-1, each token unique, and every single byte must be a token (byte-level
    BPE can then encode any input); a violation names the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: tiktoken ranks file not found")
    ranks: dict[bytes, int] = {}
    with path.open("rb") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise UserError(f"{path}:{line_no}: expected 'base64_token rank', got {line[:80]!r}")
            try:
                token = base64.b64decode(parts[0], validate=True)
                rank = int(parts[1])
            except (binascii.Error, ValueError) as e:
                raise UserError(f"{path}:{line_no}: cannot parse {line[:80]!r}: {e}") from e
            if token in ranks:
                raise UserError(
                    f"{path}:{line_no}: token {token!r} appears twice (ranks {ranks[token]}, {rank})"
                )
            ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{path}: ranks are not exactly 0..{len(ranks) - 1}")
    missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
    if missing_bytes:
        raise UserError(f"{path}: {len(missing_bytes)} single bytes have no rank, e.g. {missing_bytes[:8]}")
    return ranks


def bpe_merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Derive the BPE merge list that makes HF's BPE reproduce tiktoken's encoding.

    tiktoken has no merge list: it repeatedly joins the adjacent pair of parts whose concatenation has
    the lowest rank. HF's BPE joins the adjacent pair that appears earliest in its merge list. So a
    merge (left, right) must exist for every way a multi-byte token splits into two existing tokens
    (tiktoken may reach a token through any of them, depending on the surrounding bytes), and merges
    must be ordered by the rank of the token they produce. Splits whose halves are not tokens can never
    occur (parts are always tokens) and are skipped. Ties (one token, several splits) cannot compete
    within one word position, so their relative order does not matter; we keep it deterministic.
    """
    merges: list[tuple[int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, left, right))
    merges.sort(key=lambda m: (m[0], ranks[m[1]], ranks[m[2]]))
    return [(left, right) for _, left, right in merges]


def build_qwen_backend_tokenizer(ranks: dict[bytes, int]) -> Tokenizer:
    """The `tokenizers` object for these ranks: everything but the transformers wrapper."""
    # Byte-level BPE vocabularies are written over printable stand-ins for the 256 bytes (GPT-2's map),
    # the same map the ByteLevel pre-tokenizer and decoder use.
    byte_to_char = bytes_to_unicode()

    def to_chars(token: bytes) -> str:
        return "".join(byte_to_char[b] for b in token)

    vocab = {to_chars(token): rank for token, rank in ranks.items()}
    merges = [(to_chars(left), to_chars(right)) for left, right in bpe_merges_from_ranks(ranks)]
    # ignore_merges: a whole pre-tokenised piece that is itself a token is emitted as that token, as
    # tiktoken does (it looks the piece up before running BPE on it).
    tokenizer = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # Special tokens take the next ids in the reference's order; never NFC-normalised, never split.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    return tokenizer


def build_qwen_tokenizer(tiktoken_path: str | Path) -> PreTrainedTokenizerFast:
    """The Qwen-VL tokenizer as a `PreTrainedTokenizerFast` (loads back with `AutoTokenizer`).

    Special-token ids follow the reference: `len(ranks) + i` for the i-th of `QWEN_SPECIAL_TOKENS`
    (151643.. for the released file). eos = pad = `<|endoftext|>`, as in the release's
    generation_config. Raises ValueError if the resulting ids disagree with that layout.
    """
    ranks = read_tiktoken_ranks(tiktoken_path)
    backend = build_qwen_backend_tokenizer(ranks)
    for offset, token in enumerate(QWEN_SPECIAL_TOKENS):
        token_id = backend.token_to_id(token)
        if token_id != len(ranks) + offset:
            raise UserError(
                f"{tiktoken_path}: special token {token} got id {token_id}, expected {len(ranks) + offset} "
                "(does the ranks file already contain it as a regular token?)"
            )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        model_max_length=QWEN_MODEL_MAX_LENGTH,
        chat_template=QWEN_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


# ---------------------------------------------------------------------------------------------
# The inverse: a tokenizer -> the ranks of its qwen.tiktoken
# ---------------------------------------------------------------------------------------------

# The parts of tokenizer.json that qwen.tiktoken determines, in the order a mismatch is reported. Runtime
# settings (truncation, padding) are not part of the vocabulary.
_TOKENIZER_PARTS = ("added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder", "model")


def tiktoken_ranks_from_tokenizer(
    tokenizer: PreTrainedTokenizerFast, where: str = "tokenizer"
) -> dict[bytes, int]:
    """The {token_bytes: rank} that `qwen.tiktoken` must hold for `build_qwen_tokenizer` to
    give back `tokenizer`.

    qwen.tiktoken carries byte-level BPE ranks only: the release's tokenizer fixes everything else (its
    special tokens, right after the ranks in `QWEN_SPECIAL_TOKENS` order; the NFC normaliser; Qwen's
    pre-tokenisation regex). So the check is exact: the tokenizer rebuilt from the recovered ranks must
    serialise to the same tokenizer.json as `tokenizer`. Anything else raises UserError naming `where`
    and the first thing that differs.
    """
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    if model["type"] != "BPE":
        raise UserError(
            f"{where}: a {model['type']} tokenizer; qwen.tiktoken holds byte-level BPE ranks only"
        )
    added = {t["content"]: t["id"] for t in state["added_tokens"]}
    foreign = [t for t in added if t not in QWEN_SPECIAL_TOKENS]
    if foreign:
        raise UserError(
            f"{where}: {len(foreign)} added token(s) the release's tokenizer cannot carry (its special "
            f"tokens are a fixed set): {foreign[:5]}"
        )

    byte_of_char = {char: byte for byte, char in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for text, token_id in model["vocab"].items():
        if text in added:
            continue  # a trained tokenizer also lists its special tokens in the BPE vocabulary
        if any(c not in byte_of_char for c in text):
            raise UserError(
                f"{where}: token {text!r} (id {token_id}) is not byte-level; qwen.tiktoken holds byte strings"
            )
        ranks[bytes(byte_of_char[c] for c in text)] = token_id

    n = len(ranks)
    misplaced = [
        f"{t} has id {added.get(t)}, the release's is {n + i}"
        for i, t in enumerate(QWEN_SPECIAL_TOKENS)
        if added.get(t) != n + i
    ]
    if misplaced:
        raise UserError(
            f"{where}: the release's special tokens follow the {n} BPE ranks in a fixed order; "
            f"{len(misplaced)} of {len(QWEN_SPECIAL_TOKENS)} do not, e.g. {'; '.join(misplaced[:3])}"
        )
    if sorted(ranks.values()) != list(range(n)):
        raise UserError(f"{where}: BPE token ids are not exactly 0..{n - 1}, as qwen.tiktoken ranks must be")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise UserError(f"{where}: not every single byte is a token, as qwen.tiktoken requires")

    rebuilt = json.loads(build_qwen_backend_tokenizer(ranks).to_str())
    for part in _TOKENIZER_PARTS:
        if rebuilt[part] != state[part]:
            raise UserError(
                f"{where}: its {part} differs from the one the release's tokenizer uses with these "
                "ranks; qwen.tiktoken cannot carry it"
            )
    return ranks


def write_tiktoken_ranks(ranks: dict[bytes, int], path: str | Path) -> None:
    """Write `base64(token) rank` lines in rank order, as the released qwen.tiktoken is laid out."""
    in_rank_order = sorted(ranks.items(), key=lambda item: item[1])
    lines = (f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in in_rank_order)
    Path(path).write_text("".join(lines), encoding="ascii", newline="\n")
