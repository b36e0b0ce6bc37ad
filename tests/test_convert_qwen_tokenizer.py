"""Specification of models.qwen_tokenizer: qwen.tiktoken -> a Hugging Face fast tokenizer, and back.

The fixture writes a small ranks file with the layout of the released qwen.tiktoken: the 256 single
bytes as ranks 0-255 in a permuted order, then BPE tokens learnt on a small Chinese/English corpus.
The converted tokenizer must encode exactly like tiktoken's algorithm, re-implemented here
independently (whole piece first, else repeatedly merge the adjacent pair of lowest rank).
"""

from __future__ import annotations

import base64
import collections
import random
import unicodedata

import pytest
import regex
from tokenizers import pre_tokenizers

from models.errors import UserError
from models.qwen_tokenizer import (
    QWEN_EMBEDDING_ROWS,
    QWEN_NUM_RANKS,
    QWEN_SPECIAL_TOKENS,
    build_qwen_tokenizer,
    read_tiktoken_ranks,
    tiktoken_ranks_from_tokenizer,
    write_tiktoken_ranks,
)

# Copied from the reference's tokenization_qwen.py (PAT_STR), independent of the module under test.
PAT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CORPUS = """
Describe the image in English: a man is riding a bicycle down the street.
图片中有一只猫坐在桌子上。这是一张照片，照片里有两个人在公园里散步。
<img>/data/coco/000000123.jpg</img>What is the man holding? He is holding a red umbrella.
Generate the caption with grounding: <ref>the cat</ref><box>(120,345),(567,890)</box> sleeps.
请描述这张图片。图片里的人正在骑自行车。The weather is nice today, isn't it? I'll go.
""".strip()


def train_tiny_ranks(corpus: str, num_merges: int, seed: int = 0) -> dict[bytes, int]:
    """256 bytes in a permuted order (ranks 0-255), then tokens from a naive BPE training run."""
    byte_order = list(range(256))
    random.Random(seed).shuffle(byte_order)
    ranks = {bytes([b]): r for r, b in enumerate(byte_order)}
    words = collections.Counter(p.encode() for p in regex.findall(PAT, corpus))
    splits = {w: [bytes([b]) for b in w] for w in words}
    for _ in range(num_merges):
        pairs: collections.Counter = collections.Counter()
        for w, parts in splits.items():
            for a, b in zip(parts, parts[1:], strict=False):
                pairs[a, b] += words[w]
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks.setdefault(a + b, len(ranks))
        for w, parts in splits.items():
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            splits[w] = merged
    return ranks


def tiktoken_encode(ranks: dict[bytes, int], text: str) -> list[int]:
    """tiktoken's encode_ordinary: per regex piece, whole-piece lookup, else lowest-rank pair merging."""
    ids: list[int] = []
    for piece in regex.findall(PAT, unicodedata.normalize("NFC", text)):
        data = piece.encode()
        if data in ranks:
            ids.append(ranks[data])
            continue
        parts = [bytes([b]) for b in data]
        while True:
            candidates = [
                (ranks[parts[i] + parts[i + 1]], i)
                for i in range(len(parts) - 1)
                if parts[i] + parts[i + 1] in ranks
            ]
            if not candidates:
                break
            _, i = min(candidates)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(ranks[p] for p in parts)
    return ids


def write_ranks(path, ranks: dict[bytes, int]) -> None:
    lines = [
        f"{base64.b64encode(tok).decode()} {rank}"
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    ]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def ranks() -> dict[bytes, int]:
    return train_tiny_ranks(CORPUS, num_merges=300)


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory, ranks):
    path = tmp_path_factory.mktemp("qwen") / "qwen.tiktoken"
    write_ranks(path, ranks)
    return path


@pytest.fixture(scope="module")
def tokenizer(tiktoken_file):
    return build_qwen_tokenizer(tiktoken_file)


def test_the_fixture_has_the_released_layout(ranks):
    assert sorted(ranks[bytes([b])] for b in range(256)) == list(range(256))
    assert [ranks[bytes([b])] for b in range(256)] != list(range(256)), "bytes must be permuted"
    assert len(ranks) > 256 + 200, "the fixture must contain real merges"


def test_special_tokens_follow_the_ranks_in_the_reference_order(tokenizer, ranks):
    n = len(ranks)
    vocab = tokenizer.get_vocab()
    assert vocab["<|endoftext|>"] == n
    assert (vocab["<|im_start|>"], vocab["<|im_end|>"]) == (n + 1, n + 2)
    assert vocab["<|extra_0|>"] == n + 3 and vocab["<|extra_204|>"] == n + 207
    expected = ["<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>"]
    assert [vocab[t] for t in expected] == list(range(n + 208, n + 217))
    assert len(tokenizer) == n + 217
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"


def test_special_token_ids_of_the_released_vocabulary():
    # With the released file's 151,643 ranks the same offsets give the reference's ids.
    ids = {t: QWEN_NUM_RANKS + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
    assert ids["<|endoftext|>"] == 151643
    assert (ids["<|im_start|>"], ids["<|im_end|>"]) == (151644, 151645)
    assert (ids["<|extra_0|>"], ids["<|extra_204|>"]) == (151646, 151850)
    assert (ids["<ref>"], ids["<img>"], ids["</img>"], ids["<imgpad>"]) == (151851, 151857, 151858, 151859)
    assert max(ids.values()) < QWEN_EMBEDDING_ROWS


TEXTS = [
    "Describe the image in English: a man is riding a bicycle down the street.",
    "图片中有一只猫坐在桌子上。The weather is nice today, isn't it? I'LL go at 10:45.",
    "  leading spaces,\ttabs\n\nand new lines\r\n   trailing   ",
    "emoji 🙂 and rare bytes \x00\x7f and ﬁ ligature and Ångström and e\u0301",
]


@pytest.mark.parametrize("text", TEXTS)
def test_encoding_matches_tiktoken(tokenizer, ranks, text):
    assert tokenizer.encode(text, add_special_tokens=False) == tiktoken_encode(ranks, text)


def test_unmerged_characters_fall_back_to_single_byte_tokens(tokenizer, ranks):
    text = "🙂"  # four UTF-8 bytes the fixture never merged
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == [ranks[bytes([b])] for b in text.encode()]
    assert tokenizer.decode(ids) == text


def test_round_trip_of_mixed_text_with_image_ref_and_box_spans(tokenizer, ranks):
    text = (
        "<|im_start|>user\nPicture 1: <img>/data/图片/cat 1.jpg</img>\n"
        "请框出<ref>the cat</ref>的位置<|im_end|>\n<|im_start|>assistant\n"
        "<ref>the cat</ref><box>(120,345),(567,890)</box><|im_end|><|endoftext|>"
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    vocab = tokenizer.get_vocab()
    for special in ["<img>", "</img>", "<ref>", "</ref>", "<box>", "</box>", "<|im_start|>", "<|im_end|>"]:
        assert vocab[special] in ids, f"{special} must be one token"
    assert ids.count(vocab["<ref>"]) == 2
    assert tokenizer.decode(ids) == text
    # The text between special tokens encodes exactly as tiktoken would.
    img = ids.index(vocab["<img>"])
    assert ids[img + 1 : ids.index(vocab["</img>"])] == tiktoken_encode(ranks, "/data/图片/cat 1.jpg")


def test_text_is_nfc_normalised(tokenizer):
    decomposed = "Ångström e\u0301"
    ids = tokenizer.encode(decomposed, add_special_tokens=False)
    assert tokenizer.decode(ids) == unicodedata.normalize("NFC", decomposed)


def test_save_and_reload_with_auto_tokenizer(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = TEXTS[1] + "<img>x.jpg</img><|im_end|>"
    assert reloaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    assert reloaded.get_vocab()["<imgpad>"] == tokenizer.get_vocab()["<imgpad>"]


def test_a_malformed_ranks_file_is_refused_with_its_line(tmp_path, ranks):
    path = tmp_path / "bad.tiktoken"
    write_ranks(path, ranks)
    lines = path.read_text().splitlines()
    lines[3] = "not-base64!! 3"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"bad\.tiktoken:4"):
        read_tiktoken_ranks(path)


def test_a_ranks_file_missing_a_single_byte_is_refused(tmp_path, ranks):
    path = tmp_path / "gap.tiktoken"
    missing = bytes([ord("a")])
    renumbered = {t: r for r, t in enumerate(t for t in sorted(ranks, key=ranks.get) if t != missing)}
    write_ranks(path, renumbered)
    with pytest.raises(ValueError, match="single bytes have no rank"):
        read_tiktoken_ranks(path)


def test_overlapping_merges_on_repetitive_text_match_tiktoken(tmp_path):
    # Several splits of one token ("aaa" = a+aa = aa+a) compete on runs of one letter: the merge
    # order must still reproduce tiktoken's choice.
    order = list(range(256))
    random.Random(1).shuffle(order)
    ranks = {bytes([b]): r for r, b in enumerate(order)}
    for token in [b"aa", b"aaa", b"aaaa", b"ab", b"aab", b"aba", b"abab", b"baa", b"aaab"]:
        ranks[token] = len(ranks)
    write_ranks(tmp_path / "rep.tiktoken", ranks)
    tok = build_qwen_tokenizer(tmp_path / "rep.tiktoken")
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(1, 14)))
        assert tok.encode(text, add_special_tokens=False) == tiktoken_encode(ranks, text), text


# ------------------------------------------------------------------------------------------------
# The inverse: a tokenizer -> its qwen.tiktoken (what models.export_qwenvl writes)


def test_the_ranks_come_back_from_the_tokenizer_and_are_written_in_the_same_bytes(
    tokenizer, ranks, tiktoken_file, tmp_path
):
    assert tiktoken_ranks_from_tokenizer(tokenizer) == ranks
    write_tiktoken_ranks(ranks, tmp_path / "qwen.tiktoken")
    assert (tmp_path / "qwen.tiktoken").read_bytes() == tiktoken_file.read_bytes()


def test_a_tokenizer_that_differs_from_what_its_ranks_imply_is_refused(tiktoken_file):
    gpt2_pieces = build_qwen_tokenizer(tiktoken_file)
    gpt2_pieces.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    with pytest.raises(UserError, match="^tok: its pre_tokenizer differs"):
        tiktoken_ranks_from_tokenizer(gpt2_pieces, where="tok")
    not_nfc = build_qwen_tokenizer(tiktoken_file)
    not_nfc.backend_tokenizer.normalizer = None
    with pytest.raises(UserError, match="^tok: its normalizer differs"):
        tiktoken_ranks_from_tokenizer(not_nfc, where="tok")


def test_special_tokens_the_release_does_not_have_or_puts_elsewhere_are_refused(
    tiktoken_file, tiny_tokenizer
):
    extended = build_qwen_tokenizer(tiktoken_file)
    extended.add_special_tokens({"additional_special_tokens": ["<|tool_call|>"]})
    with pytest.raises(
        UserError, match=r"1 added token\(s\) the release's tokenizer cannot carry.*tool_call"
    ):
        tiktoken_ranks_from_tokenizer(extended, where="tok")
    # tests/conftest.py's BPE was trained with its special tokens first, at ids 0..11
    with pytest.raises(UserError, match="<\\|endoftext\\|> has id 0, the release's is"):
        tiktoken_ranks_from_tokenizer(tiny_tokenizer, where="tok")


# ------------------------------------------------------------------------------------------------
# The released vocabulary itself, kept in the repository (see tests/assets/qwen_vl/README.md; conftest's
# released_qwen_tiktoken finds it)


@pytest.fixture(scope="module")
def released_tokenizer(released_qwen_tiktoken):
    return build_qwen_tokenizer(released_qwen_tiktoken)  # ~20 s: 151,643 ranks, 294,166 merges


@pytest.mark.slow
def test_the_released_vocabulary(released_tokenizer, released_qwen_tiktoken):
    ranks = read_tiktoken_ranks(released_qwen_tiktoken)
    assert len(ranks) == QWEN_NUM_RANKS
    vocab = released_tokenizer.get_vocab()
    assert (vocab["<|endoftext|>"], vocab["<|im_end|>"], vocab["<ref>"], vocab["<imgpad>"]) == (
        151643,
        151645,
        151851,
        151859,
    )
    for text in TEXTS + [
        "Generate the caption in English with grounding: <ref> a dog</ref><box>(1,2),(3,4)</box>"
    ]:
        plain = text.split("<")[0]
        assert released_tokenizer.encode(plain, add_special_tokens=False) == tiktoken_encode(ranks, plain)


@pytest.mark.slow
def test_the_released_vocabulary_survives_convert_then_export_byte_for_byte(
    released_tokenizer, released_qwen_tiktoken, tmp_path
):
    from models.export_qwenvl import read_saved_tokenizer

    released_tokenizer.save_pretrained(tmp_path)  # what models.convert_qwenvl writes beside the model
    ranks = tiktoken_ranks_from_tokenizer(read_saved_tokenizer(tmp_path))  # what models.export_qwenvl reads
    write_tiktoken_ranks(ranks, tmp_path / "qwen.tiktoken")
    assert (tmp_path / "qwen.tiktoken").read_bytes() == released_qwen_tiktoken.read_bytes()
    # Converting that file again gives the same tokenizer: tiktoken_ranks_from_tokenizer has already
    # rebuilt it from the ranks and found its tokenizer.json identical to the one exported.
