"""ChatML rendering of conversations and the loss mask of the reference finetune.py (reference 3.2).

Each block is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``, tokenised piece by piece as the reference
does (role, "\\n" and content separately), starting with a system block. Labels (``assistant_only=False``,
the reference's exact rule): in every block ``<|im_start|>``, ``<|im_end|>`` and the "\\n" after it keep
their ids; assistant content is supervised; role names, the role's "\\n" and system/user content are -100.
With ``assistant_only=True`` only assistant content and its ``<|im_end|>`` are supervised.
Image spans are never supervised, and (design.md) the first label of a sample is always -100.
A preference pair (``render_preference_pair``) is two such samples sharing the prompt, each supervised
only on its answer.
"""

from __future__ import annotations

from data.sample import IGNORE_INDEX, TokenizedSample, mask_first_label, mask_image_spans
from data.text import Message, encode_text_with_images, token_id, tokenize_plain
from models.tokens import IM_END, IM_START, IMG_END, IMG_START

DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")


def validate_conversation(conversation: list[dict]) -> None:
    """ValueError unless the conversation is a non-empty list of {from: system|user|assistant, value: str}
    turns, with at most one system turn and only in first place, and a user turn before any assistant turn.
    A value may also be a ``data.text.Message`` (a chat's typed turn; no data file can hold one)."""
    if not isinstance(conversation, list) or not conversation:
        raise ValueError("empty conversation (need at least one user turn)")
    for j, turn in enumerate(conversation):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"turn {j} must be an object with 'from' and 'value', got {turn!r:.80}")
        if turn["from"] not in ROLES:
            raise ValueError(f"turn {j} has role {turn['from']!r}; allowed roles are {', '.join(ROLES)}")
        if not isinstance(turn["value"], (str, Message)):
            raise ValueError(f"turn {j} value must be a string, got {type(turn['value']).__name__}")
        if turn["from"] == "system" and j != 0:
            raise ValueError(f"turn {j}: a system turn may only come first")
    dialog = conversation[1:] if conversation[0]["from"] == "system" else conversation
    if not dialog:
        raise ValueError("empty conversation (only a system turn)")
    if dialog[0]["from"] != "user":
        # The reference silently dropped a leading non-user turn; we refuse it so nothing vanishes unseen.
        raise ValueError("the first turn after the system message must come from 'user'")


def render_chatml(
    tokenizer,
    conversation: list[dict],
    num_image_tokens: int,
    system_message: str = DEFAULT_SYSTEM_MESSAGE,
    assistant_only: bool = False,
) -> TokenizedSample:
    """Tokenise a conversation as ChatML with the reference's labels (see module docstring).

    ``conversation`` is a list of ``{"from": "system"|"user"|"assistant", "value": str}``; a leading system
    turn replaces ``system_message``. Images ``<img>path</img>`` become image spans (paths returned in order).
    A ``Message`` value (a chat's typed turn) is tokenised piece by piece, its text never parsed for markup.
    """
    validate_conversation(conversation)
    im_start, im_end = token_id(tokenizer, IM_START), token_id(tokenizer, IM_END)
    img_start, img_end = token_id(tokenizer, IMG_START), token_id(tokenizer, IMG_END)
    nl = tokenize_plain(tokenizer, "\n")

    if conversation[0]["from"] == "system":
        system_message, turns = conversation[0]["value"], conversation[1:]
    else:
        turns = conversation
    blocks = [("system", system_message)] + [(t["from"], t["value"]) for t in turns]

    input_ids: list[int] = []
    labels: list[int] = []
    image_paths: list[str] = []
    for role, value in blocks:
        head = [im_start] + tokenize_plain(tokenizer, role) + nl  # "<|im_start|>role\n"
        content, paths = encode_text_with_images(tokenizer, value, num_image_tokens)
        image_paths += paths
        ids = head + content + [im_end] + nl
        if role == "assistant":
            content_labels = list(content)
            mask_image_spans(content, content_labels, img_start, img_end)
            if assistant_only:
                lab = [IGNORE_INDEX] * len(head) + content_labels + [im_end] + [IGNORE_INDEX] * len(nl)
            else:
                lab = [im_start] + [IGNORE_INDEX] * (len(head) - 1) + content_labels + [im_end] + nl
        elif assistant_only:
            lab = [IGNORE_INDEX] * len(ids)
        else:
            lab = [im_start] + [IGNORE_INDEX] * (len(ids) - 1 - 1 - len(nl)) + [im_end] + nl
        input_ids += ids
        labels += lab
    return mask_first_label(TokenizedSample(input_ids, labels, image_paths))


def render_preference_pair(
    tokenizer,
    conversation: list[dict],
    chosen: str,
    rejected: str,
    num_image_tokens: int,
    system_message: str = DEFAULT_SYSTEM_MESSAGE,
) -> tuple[TokenizedSample, TokenizedSample]:
    """A preference pair as two ChatML samples: the prompt ``conversation`` (ending with a user turn) followed
    by the chosen, then the rejected assistant answer. Blocks are tokenised one by one, so both start with
    the same prompt tokens. Labels cover only the final answer: its content and its ``<|im_end|>`` (as
    ``assistant_only``); nothing of the prompt, earlier assistant turns included."""
    prompt_len = len(render_chatml(tokenizer, conversation, num_image_tokens, system_message))
    pair = []
    for answer in (chosen, rejected):
        sample = render_chatml(
            tokenizer,
            [*conversation, {"from": "assistant", "value": answer}],
            num_image_tokens,
            system_message,
            assistant_only=True,
        )
        sample.labels[:prompt_len] = [IGNORE_INDEX] * prompt_len
        pair.append(sample)
    return pair[0], pair[1]


def encode_chat_prompt(
    tokenizer, user_text: str, num_image_tokens: int, system_message: str = DEFAULT_SYSTEM_MESSAGE
) -> tuple[list[int], list[str]]:
    """Ids of a one-turn ChatML prompt that ends where the assistant's answer starts
    (``...<|im_start|>assistant\\n``), tokenised exactly as training conversations are;
    and its image paths."""
    return encode_conversation_prompt(
        tokenizer, [{"from": "user", "value": user_text}], num_image_tokens, system_message
    )


def encode_conversation_prompt(
    tokenizer, conversation: list[dict], num_image_tokens: int, system_message: str = DEFAULT_SYSTEM_MESSAGE
) -> tuple[list[int], list[str]]:
    """Ids of a multi-turn ChatML prompt (the conversation so far, ending with a user turn) followed by
    ``<|im_start|>assistant\\n``: rendered by ``render_chatml``, so a chat's prompt is exactly the prefix of
    the training sample its finished conversation would be. Returns (ids, image paths in order)."""
    if not conversation or conversation[-1].get("from") != "user":
        raise ValueError("a prompt conversation must end with a user turn")
    sample = render_chatml(tokenizer, conversation, num_image_tokens, system_message)
    im_start = token_id(tokenizer, IM_START)
    assistant_head = [im_start] + tokenize_plain(tokenizer, "assistant") + tokenize_plain(tokenizer, "\n")
    return sample.input_ids + assistant_head, sample.image_paths
