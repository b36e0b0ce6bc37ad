"""data.chatml: ChatML rendering and labels, pinned against the reference finetune.py rule (reference 3.2)
on the README fine-tune example (reference 6.4)."""

import re

import pytest

from data.chatml import DEFAULT_SYSTEM_MESSAGE, encode_chat_prompt, render_chatml

IGNORE = -100
N_IMG = 5

# Qwen-VL README fine-tune example, record identity_1 (one image, a VQA turn and a grounding turn).
README_EXAMPLE = [
    {
        "from": "user",
        "value": "Picture 1: <img>https://qianwen-res.oss-cn-beijing.aliyuncs.com/Qwen-VL/assets/demo.jpeg</img>\n图中的狗是什么品种？",
    },
    {"from": "assistant", "value": "图中是一只拉布拉多犬。"},
    {"from": "user", "value": "框出图中的格子衬衫"},
    {"from": "assistant", "value": "<ref>格子衬衫</ref><box>(588,499),(725,789)</box>"},
]


def reference_preprocess(tok, conversation, system_message=DEFAULT_SYSTEM_MESSAGE):
    """An independent transcription of finetune.py preprocess() (L124-175) for one conversation.

    The only change: `<img>path</img>` is spelled out as `<img>` + N x `<imgpad>` + `</img>` in the string
    before tokenising (we pass pixels, not path bytes), and the whole value is tokenised in one call.
    """

    def t(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    nl_tokens = t("\n")
    roles = {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}
    _system = t("system") + nl_tokens
    system = [im_start] + _system + t(system_message) + [im_end] + nl_tokens
    input_id, target = list(system), [im_start] + [IGNORE] * (len(system) - 3) + [im_end] + nl_tokens
    for sentence in conversation:
        role = roles[sentence["from"]]
        value = re.sub(r"<img>.*?</img>", "<img>" + "<imgpad>" * N_IMG + "</img>", sentence["value"])
        _input_id = t(role) + nl_tokens + t(value) + [im_end] + nl_tokens
        input_id += _input_id
        if role == "<|im_start|>user":
            _target = [im_start] + [IGNORE] * (len(_input_id) - 3) + [im_end] + nl_tokens
        else:
            _target = (
                [im_start] + [IGNORE] * len(t(role)) + _input_id[len(t(role)) + 1 : -2] + [im_end] + nl_tokens
            )
        target += _target
    return input_id, target


def test_readme_example_matches_the_reference_labels_token_by_token(tiny_tokenizer):
    tok = tiny_tokenizer
    sample = render_chatml(tok, README_EXAMPLE, N_IMG)
    ref_ids, ref_labels = reference_preprocess(tok, README_EXAMPLE)
    assert sample.input_ids == ref_ids
    assert sample.image_paths == ["https://qianwen-res.oss-cn-beijing.aliyuncs.com/Qwen-VL/assets/demo.jpeg"]
    # Our one deliberate difference (design.md): the first label of a sample is -100. The reference's
    # label there (<|im_start|>) is never used by the shifted loss of an unpacked row anyway.
    assert ref_labels[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert sample.labels == [IGNORE] + ref_labels[1:]


def test_readme_example_supervises_structure_and_assistant_content(tiny_tokenizer):
    tok = tiny_tokenizer
    sample = render_chatml(tok, README_EXAMPLE, N_IMG)
    supervised = tok.decode([t for t in sample.labels if t != IGNORE])
    # 4 turns + system = 5 blocks; every block keeps <|im_start|> (except the very first), <|im_end|> and "\n"
    assert supervised == (
        "<|im_end|>\n"
        + "<|im_start|><|im_end|>\n"
        + "<|im_start|>图中是一只拉布拉多犬。<|im_end|>\n"
        + "<|im_start|><|im_end|>\n"
        + "<|im_start|><ref>格子衬衫</ref><box>(588,499),(725,789)</box><|im_end|>\n"
    )
    imgpad = tok.convert_tokens_to_ids("<imgpad>")
    assert all(lab == IGNORE for i, lab in zip(sample.input_ids, sample.labels, strict=True) if i == imgpad)


def test_assistant_only_supervises_assistant_content_and_its_im_end(tiny_tokenizer):
    tok = tiny_tokenizer
    sample = render_chatml(tok, README_EXAMPLE, N_IMG, assistant_only=True)
    assert sample.input_ids == render_chatml(tok, README_EXAMPLE, N_IMG).input_ids
    supervised = tok.decode([t for t in sample.labels if t != IGNORE])
    assert (
        supervised
        == "图中是一只拉布拉多犬。<|im_end|><ref>格子衬衫</ref><box>(588,499),(725,789)</box><|im_end|>"
    )


def test_system_turn_replaces_the_default_system_message(tiny_tokenizer):
    tok = tiny_tokenizer
    conv = [
        {"from": "system", "value": "Be brief."},
        {"from": "user", "value": "hi"},
        {"from": "assistant", "value": "yes"},
    ]
    text = tok.decode(render_chatml(tok, conv, N_IMG).input_ids)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nyes<|im_end|>\n"
    )


def test_images_in_assistant_turns_are_not_supervised(tiny_tokenizer):
    tok = tiny_tokenizer
    conv = [{"from": "user", "value": "draw"}, {"from": "assistant", "value": "ok <img>x.png</img> done"}]
    sample = render_chatml(tok, conv, N_IMG)
    span = {tok.convert_tokens_to_ids(t) for t in ("<img>", "</img>", "<imgpad>")}
    assert all(lab == IGNORE for i, lab in zip(sample.input_ids, sample.labels, strict=True) if i in span)
    assert sample.image_paths == ["x.png"]


@pytest.mark.parametrize(
    "conv, message",
    [
        ([], "empty conversation"),
        ([{"from": "system", "value": "s"}], "empty conversation"),
        ([{"from": "user", "value": "a"}, {"from": "bot", "value": "b"}], "role 'bot'"),
        ([{"from": "assistant", "value": "a"}], "first turn"),
        (
            [{"from": "user", "value": "a"}, {"from": "system", "value": "b"}],
            "system turn may only come first",
        ),
        ([{"from": "user"}], "'from' and 'value'"),
    ],
)
def test_bad_conversations_raise(tiny_tokenizer, conv, message):
    with pytest.raises(ValueError, match=message):
        render_chatml(tiny_tokenizer, conv, N_IMG)


def test_chat_prompt_is_the_training_rendering_up_to_the_answer(tiny_tokenizer):
    """Evaluation prompts (eval_mm, ChatML) see exactly the tokens training put before an answer."""
    question = "Picture 1: <img>a.png</img>\nWhat color is the circle?"
    prompt_ids, paths = encode_chat_prompt(tiny_tokenizer, question, num_image_tokens=4)
    trained = render_chatml(
        tiny_tokenizer,
        [{"from": "user", "value": question}, {"from": "assistant", "value": "red"}],
        num_image_tokens=4,
    )
    answer_ids = tiny_tokenizer("red", add_special_tokens=False)["input_ids"]
    assert trained.input_ids[: len(prompt_ids)] == prompt_ids
    assert trained.input_ids[len(prompt_ids) : len(prompt_ids) + len(answer_ids)] == answer_ids
    assert paths == trained.image_paths == ["a.png"]


class NoVocabCopies:
    """A tokenizer whose get_vocab() fails: that call copies the whole vocabulary (0.3 s for Qwen's
    151k tokens), so rendering must look up its special tokens one by one instead."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def get_vocab(self):
        raise AssertionError("get_vocab() called while rendering a sample")

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_rendering_never_copies_the_vocabulary(tiny_tokenizer):
    from data.dataset import DataConfig, SampleBuilder

    tok = NoVocabCopies(tiny_tokenizer)
    expected = render_chatml(tiny_tokenizer, README_EXAMPLE, N_IMG)
    assert render_chatml(tok, README_EXAMPLE, N_IMG) == expected
    builder = SampleBuilder(tok, N_IMG, DataConfig(paths=[]))
    assert builder.tokenize({"task": "vqa", "image": "a.png", "question": "Is it red?", "answer": "yes"}, "r")
    assert encode_chat_prompt(tok, "hi", N_IMG)[0]
