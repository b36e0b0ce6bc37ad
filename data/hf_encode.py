"""The project's conversations in a Hugging Face VLM family's own tokens (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

Input: a chat record as data.formats normalises every format (Qwen-VL JSON, LLaVA, messages):
``{"conversations": [{"from": "system"|"user"|"assistant", "value": "... <img>path</img> ..."}]}``.
Output: the ids the family's own processor gives that conversation, token for token
(``processor.apply_chat_template`` then ``processor(text, images)``), and labels.

How:
1. Each turn becomes a chat message; ``<img>path</img>`` becomes an image item in place, text around it stays
   as it is (so Qwen-VL's ``Picture 1: <img>..</img>\\n`` keeps its "Picture 1: " and newline).
2. The family's chat template renders the text (it decides the default system prompt: Qwen2/2.5-VL insert
   "You are a helpful assistant.", Qwen3-VL none). The whole text is tokenised at once, as the processor
   does, so BPE pieces are the processor's.
3. Each ``<|image_pad|>`` becomes one pad per merged patch of that image's own grid (its size after the
   family's resize within min/max pixels): ``t * h * w / merge_size**2``.
4. Labels: only assistant turns are supervised, each turn's content and its end marker ``<|im_end|>``
   (not the newline after it, not ``<|im_start|>assistant\\n``), as docs/data.md describes for ChatML with
   assistant_only. Spans come from the template itself: the text rendered up to the assistant turn with
   the generation prompt ends where the answer begins, and up to the turn itself where it ends. A token is
   supervised when it starts inside such a span (a BPE piece that joins the prompt's last newline to a
   newline opening the answer is not). A preference pair's sequences (``answer_only``) supervise only the
   last assistant turn, the answer the pair compares, as data.chatml's ``render_preference_pair`` does.

Boxes: with ``box_convention``, our ``<ref>``/``<box>`` text is first rewritten into the family's convention
(data.hf_boxes), each box against the last image before it.

Images are allowed in user turns only: Qwen3-VL's template drops images of other roles without a word.
Videos are not supported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import ProcessorMixin
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from data.hf_boxes import ImageGeometry, boxes_to_family
from data.image_files import decode_image
from data.sample import IGNORE_INDEX, TokenizedSample, truncate_span_safe
from data.text import split_image_spans
from models.tokens import IMG_END, IMG_START

ROLES = {"system": "system", "user": "user", "assistant": "assistant"}


@dataclass
class FamilySample(TokenizedSample):
    """A tokenised sample in a family's tokens; ``image_grid_thw`` holds each image's (t, h, w) patch grid
    in the order of ``image_paths`` (the model's ``image_grid_thw`` rows)."""

    image_grid_thw: list[tuple[int, int, int]] = field(default_factory=list)


def to_messages(conversation: list[dict]) -> tuple[list[dict], list[str]]:
    """Our turns -> chat messages for ``apply_chat_template``, and the image paths in order.

    A turn without images keeps its text as a string; one with images becomes a content list of text and
    ``{"type": "image"}`` items in the order written. ValueError on an image outside a user turn.
    """
    messages, paths = [], []
    for j, turn in enumerate(conversation):
        role = ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"turn {j} has role {turn['from']!r}; allowed roles are {', '.join(ROLES)}")
        pieces = split_image_spans(turn["value"])
        if not any(kind == "image" for kind, _ in pieces):
            messages.append({"role": role, "content": turn["value"]})
            continue
        if role != "user":
            raise ValueError(f"turn {j}: images are allowed in user turns only, found one in a {role} turn")
        content = []
        for kind, value in pieces:
            if kind == "image":
                content.append({"type": "image"})
                paths.append(value)
            else:
                content.append({"type": "text", "text": value})
        messages.append({"role": role, "content": content})
    return messages, paths


def image_grid(processor: ProcessorMixin, width: int, height: int) -> tuple[int, int, int]:
    """The (t, h, w) patch grid the family's image processor gives a still image of this size: resized to
    multiples of patch x merge within its min/max pixels (transformers' own ``smart_resize``), t = 1."""
    resized_h, resized_w = resized_size(processor, width, height)[::-1]
    patch = processor.image_processor.patch_size
    return 1, resized_h // patch, resized_w // patch


def resized_size(processor: ProcessorMixin, width: int, height: int) -> tuple[int, int]:
    """(width, height) of the image as the model sees it (what Qwen2.5-VL's absolute boxes refer to)."""
    image_processor = processor.image_processor
    factor = image_processor.patch_size * image_processor.merge_size
    h, w = smart_resize(
        height,
        width,
        factor=factor,
        min_pixels=image_processor.size["shortest_edge"],
        max_pixels=image_processor.size["longest_edge"],
    )
    return w, h


def num_image_tokens(processor: ProcessorMixin, grid_thw: tuple[int, int, int]) -> int:
    """Pads of one image: its patches after the merge_size x merge_size merge."""
    t, h, w = grid_thw
    return t * h * w // processor.image_processor.merge_size**2


def _supervised_spans(
    processor: ProcessorMixin, messages: list[dict], text: str, stop_at: int | None = None
) -> list[tuple[int, int]]:
    """Character spans of ``text`` (the rendered conversation) that hold assistant content + end marker.

    Each turn's span comes from rendering the conversation up to it, the template's own answer of where the
    turn starts; that is quadratic in the number of turns (1.3 s for a 600-turn record). ``stop_at``: a
    character offset past which nothing is kept (the sample's cut); turns starting there are not rendered."""
    end_marker = processor.tokenizer.eos_token  # <|im_end|> in every family's Instruct release
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = processor.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        if stop_at is not None and len(prompt) >= stop_at:
            break
        through_turn = processor.apply_chat_template(messages[: k + 1], tokenize=False)
        if not (text.startswith(prompt) and text.startswith(through_turn)):
            raise ValueError(
                "the chat template renders a conversation's beginning differently from the whole; "
                "cannot tell which tokens are the assistant's"
            )
        end = through_turn.rindex(end_marker) + len(end_marker)
        if end <= len(prompt):
            raise ValueError(f"assistant turn {k} renders without its {end_marker}")
        spans.append((len(prompt), end))
    return spans


def convert_boxes(
    processor: ProcessorMixin,
    conversation: list[dict],
    image_sizes: list[tuple[int, int]],
    box_convention: str,
) -> list[dict]:
    """The conversation with its ``<ref>``/``<box>`` text in the family's box convention (data.hf_boxes).
    A box refers to the last image before it in the conversation (Qwen2.5-VL's absolute pixels need it)."""
    geometries = [ImageGeometry(w, h, *resized_size(processor, w, h)) for w, h in image_sizes]
    seen = 0
    turns = []
    for turn in conversation:
        value = []
        for kind, piece in split_image_spans(turn["value"]):
            if kind == "image":
                value.append(f"{IMG_START}{piece}{IMG_END}")
                seen += 1
            else:
                value.append(boxes_to_family(piece, box_convention, geometries[seen - 1] if seen else None))
        turns.append({**turn, "value": "".join(value)})
    return turns


def encode_conversation(
    processor: ProcessorMixin,
    conversation: list[dict],
    image_sizes: list[tuple[int, int]],
    box_convention: str | None = None,
    answer_only: bool = False,
    max_len: int | None = None,
) -> FamilySample:
    """Token ids and labels of a conversation in the family's tokens (module docstring).

    ``image_sizes``: (width, height) of each image, in the order the images appear; each sets its grid
    (``image_grid``). ``box_convention`` (the family's ``spec.box_convention``): boxes are rewritten into it
    first; None leaves the text as it is. ``answer_only``: only the last assistant turn is supervised (one
    sequence of a preference pair). ``max_len``: where the caller will cut the sample; the turns that start
    after it are left unsupervised rather than rendered (the labels up to the cut are the same).
    ValueError if the sizes and the images differ in number.
    """
    messages, paths = to_messages(conversation)
    if len(image_sizes) != len(paths):
        raise ValueError(f"{len(paths)} images in the conversation but {len(image_sizes)} image sizes")
    if box_convention is not None:
        messages, _ = to_messages(convert_boxes(processor, conversation, image_sizes, box_convention))
    image_grids = [image_grid(processor, w, h) for w, h in image_sizes]
    text = processor.apply_chat_template(messages, tokenize=False)
    tokens = _tokens_with_image_spans(processor, text, image_grids)
    # The first character at or after the cut: a turn starting there only labels tokens that are cut away.
    stop_at = None
    if max_len is not None and not answer_only:
        stop_at = next((start for _, start in tokens[max_len:] if start is not None), None)
    spans = _supervised_spans(processor, messages, text, stop_at)
    if answer_only:
        spans = spans[-1:]
    input_ids, labels = [], []
    span = 0  # spans and token offsets both ascend: one sweep
    for token, start in tokens:
        input_ids.append(token)
        if start is not None:
            while span < len(spans) and spans[span][1] <= start:
                span += 1
        supervised = start is not None and span < len(spans) and spans[span][0] <= start
        labels.append(token if supervised else IGNORE_INDEX)
    return FamilySample(input_ids, labels, paths, [tuple(g) for g in image_grids])


def _tokens_with_image_spans(
    processor: ProcessorMixin, text: str, image_grids: list[tuple[int, int, int]]
) -> list[tuple[int, int | None]]:
    """(token id, character offset in ``text``) of the rendered ``text`` tokenised at once, as the processor
    does, each ``<|image_pad|>`` expanded to its image's pads (offset None). ValueError when the text holds
    another number of images than ``image_grids``."""
    encoded = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    pad_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    tokens: list[tuple[int, int | None]] = []
    grids = iter(image_grids)
    for token, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        if token != pad_id:
            tokens.append((token, start))
            continue
        grid = next(grids, None)
        if grid is None:
            raise ValueError("the text holds more image placeholders than images")
        tokens += [(pad_id, None)] * num_image_tokens(processor, grid)
    if next(grids, None) is not None:
        raise ValueError("the chat template dropped an image of the conversation")
    return tokens


def encode_prompt(
    processor: ProcessorMixin, messages: list[dict], image_grids: list[tuple[int, int, int]]
) -> tuple[list[int], str]:
    """Ids of chat ``messages`` (``to_messages`` form, ending with a user turn) up to where the assistant's
    answer starts (the template's generation prompt), and that text with one pad per image: the prompt
    ``encode_conversation`` gives the same conversation, for evaluation and chat."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return [token for token, _ in _tokens_with_image_spans(processor, text, image_grids)], text


def truncate_family_sample(
    sample: FamilySample, max_len: int, start_id: int, end_id: int
) -> FamilySample | None:
    """data.sample's span-safe truncation with the family's image markers (``<|vision_start|>``,
    ``<|vision_end|>``): never inside an image span; the grids of the images cut away go with them. None when
    nothing supervised survives (the caller drops and counts the sample)."""
    cut = truncate_span_safe(sample, max_len, start_id, end_id)
    if cut is None or cut is sample:
        return cut
    kept = len(cut.image_paths)
    return FamilySample(cut.input_ids, cut.labels, cut.image_paths, sample.image_grid_thw[:kept])


def encode_images(processor: ProcessorMixin, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """``pixel_values`` [sum of t*h*w, C*T*p*p] and ``image_grid_thw`` [n, 3] of the images, by the family's
    image processor (run in DataLoader workers)."""
    if not images:
        return {}
    out = processor.image_processor(images=images, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def encode_record(
    processor: ProcessorMixin, record: dict, box_convention: str | None = None, where: str = ""
) -> tuple[FamilySample, dict]:
    """A normalised chat record with its images decoded: (sample, {pixel_values, image_grid_thw})."""
    _, paths = to_messages(record["conversations"])
    images = [decode_image(path, where) for path in paths]
    sample = encode_conversation(
        processor, record["conversations"], [image.size for image in images], box_convention
    )
    return sample, encode_images(processor, images)
