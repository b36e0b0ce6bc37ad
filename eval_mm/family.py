"""Evaluation and chat with a Hugging Face family model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL; models.families).

The benchmarks, their prompts and their metrics are the Qwen-VL model's (eval_mm.benchmarks, eval_mm.metrics);
what changes is how a prompt reaches the model and how its answer comes back:

* prompts are rendered with the family's own chat template and tokens (data.hf_encode.encode_prompt), each
  image a placeholder span sized by that image's grid; the images go through the family's image processor,
  in the DataLoader workers (the batch builders below are collate functions);
* a grounding prompt ``<ref>phrase</ref><box>`` becomes the family's own request, and the boxes of its
  answer come back from the family's convention into ours (data.hf_boxes) before the metric sees them;
  ``raw_output`` keeps the family's own text. The answer may be as long as the family's widest box answer
  (``grounding_answer_budget``): a benchmark's ``max_new_tokens`` counts Qwen-VL's, which only continues the
  prompt's open ``<box>`` with coordinates, where the JSON families write the label and the markup too;
* generation is the transformers model's own ``generate`` (HFFamilyModel.generate);
* likelihood-ranked benchmarks score with the per-token log-probs of ``HFFamilyModel.forward``
  (``return_token_logps``, models.loss), the quantity training uses: a multiple-choice option by the mean
  cross-entropy of its tokens after the prompt, a preference pair by log p(chosen) - log p(rejected) over the
  final answer's supervised tokens (data.hf_encode's labels).

Family models are chat models: the only prompt format is their chat template ("chatml"); "raw" is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import ProcessorMixin

from data.hf_boxes import (
    BOX_JSON_ABSOLUTE,
    ImageGeometry,
    boxes_from_family,
    boxes_to_family,
    family_answer_to_qwen_vl,
)
from data.hf_collate import collate_family_batch
from data.hf_encode import (
    FamilySample,
    encode_conversation,
    encode_images,
    encode_prompt,
    image_grid,
    resized_size,
)
from data.image_files import decode_image
from data.sample import IGNORE_INDEX
from data.text import split_image_spans, tokenize_plain
from eval_mm.benchmarks import Benchmark
from eval_mm.datasets import EvalSample
from eval_mm.inference import PromptBatch, generate_tokens, left_pad, model_dtype, stop_token_ids
from eval_mm.prompts import option_continuation
from models.errors import UserError
from models.loading import base_vlm
from models.tokens import BOX_END, REF_START

# The family's chat template: stop words <|im_end|>, <|im_start|>, <|endoftext|>, options scored as "A".
FAMILY_PROMPT_FORMAT = "chatml"


def check_family_prompt_format(prompt_format: str) -> None:
    if prompt_format != FAMILY_PROMPT_FORMAT:
        raise UserError(
            f"prompt format {prompt_format!r}: a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model is prompted "
            f"with its own chat template only (use --prompt-format auto or {FAMILY_PROMPT_FORMAT})"
        )


# ------------------------------------------------------------------------------------------ prompts
@dataclass
class FamilyPrompt:
    ids: list[int]  # up to where the assistant's answer starts
    text: str  # the rendered template, one pad per image (what the predictions file shows)
    images: list[Image.Image]  # decoded, in order
    geometry: ImageGeometry | None  # the last image's: what the boxes of the answer refer to


def encode_family_prompt(
    processor: ProcessorMixin,
    box_convention: str,
    turns: list[tuple[str, list]],
    where: str = "",
    system: str | None = None,
) -> FamilyPrompt:
    """A conversation ending with a user turn, in the family's tokens. ``turns``: (role, pieces), pieces
    ``("text", s)`` or ``("image", path)`` in order; images are taken only from image pieces (text is never
    parsed for them). A user turn's ``<ref>``/``<box>`` text is rewritten into the family's convention
    against the last image before it; assistant turns are the family's own answers, kept as they are.
    ``system``: a system message (None: the template's default). ValueError for a box the convention cannot
    carry; data.image_files.ImageLoadError (naming ``where``) for an image that cannot be read."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    images: list[Image.Image] = []
    geometry = None
    for role, pieces in turns:
        content = []
        for kind, value in pieces:
            if kind == "image":
                image = decode_image(value, where)
                images.append(image)
                geometry = ImageGeometry(*image.size, *resized_size(processor, *image.size))
                content.append({"type": "image"})
            elif value:
                text = boxes_to_family(value, box_convention, geometry) if role == "user" else value
                content.append({"type": "text", "text": text})
        messages.append({"role": role, "content": content})
    grids = [image_grid(processor, *image.size) for image in images]
    ids, text = encode_prompt(processor, messages, grids)
    return FamilyPrompt(ids, text, images, geometry)


def family_answer(
    tokenizer, new_tokens: list[int], stop_ids: list[int], box_convention: str, geometry: ImageGeometry | None
) -> tuple[str, str]:
    """(the answer as the metrics and chat read it, the family's own text) of generated tokens.

    The family's text keeps special tokens (Qwen2-VL's boxes are special tokens). When it holds boxes, the
    answer is them in our ``<ref>``/``<box>`` markup (data.hf_boxes.family_answer_to_qwen_vl); otherwise it is
    the text without special tokens, as for the Qwen-VL model."""
    kept = [t for t in new_tokens if t not in stop_ids]
    own = tokenizer.decode(kept, skip_special_tokens=False).strip()
    if box_convention == BOX_JSON_ABSOLUTE and geometry is None:  # pixels of no image: nothing to convert
        return tokenizer.decode(kept, skip_special_tokens=True).strip(), own
    if boxes_from_family(own, box_convention, geometry):
        return family_answer_to_qwen_vl(own, box_convention, geometry), own
    return tokenizer.decode(kept, skip_special_tokens=True).strip(), own


def grounding_answer_budget(
    processor: ProcessorMixin, box_convention: str, prompt_text: str, geometry: ImageGeometry | None
) -> int:
    """How many new tokens the family's answer to a grounding prompt (ending ``<ref>label</ref><box>``) may
    need: one box for that label at its widest (three-digit coordinates; in pixels, the resized image's last
    one) written in the family's convention, as its training data writes it, plus the end-of-turn token."""
    request = prompt_text[prompt_text.rindex(REF_START) :]
    widest = boxes_to_family(f"{request}(999,999),(999,999){BOX_END}", box_convention, geometry)
    return len(tokenize_plain(processor.tokenizer, widest)) + 1


# ------------------------------------------------------------------------------------------ batches
@dataclass
class FamilyPromptBatch(PromptBatch):
    """A PromptBatch of family prompts: ``pixel_values`` are patch rows (the image processor's), and each
    image's grid is a row of ``image_grid_thw``; ``geometries``: per sample, its last image's;
    ``max_new_tokens``: the generation budget of the batch (the benchmark's, or its grounding answers')."""

    image_grid_thw: torch.Tensor | None = None
    geometries: list[ImageGeometry | None] | None = None
    max_new_tokens: int = 0


def _pixels(processor: ProcessorMixin, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = encode_images(processor, images)
    if not encoded:
        return torch.zeros(0, 0), torch.zeros(0, 3, dtype=torch.long)
    return encoded["pixel_values"], encoded["image_grid_thw"]


class FamilyBatchBuilder:
    """Collate function (run in DataLoader workers): samples -> FamilyPromptBatch, one left-padded row each;
    for multiple choice also each option's token ids."""

    def __init__(self, processor: ProcessorMixin, bench: Benchmark, box_convention: str):
        self.processor, self.bench, self.box_convention = processor, bench, box_convention
        self.pad_id = processor.tokenizer.pad_token_id

    def __call__(self, samples: list[EvalSample]) -> FamilyPromptBatch:
        rows, prompts, images, num_images, geometries, option_ids = [], [], [], [], [], []
        max_new_tokens = self.bench.max_new_tokens
        for sample in samples:
            where = f"{self.bench.name} sample {sample.id} of {self.bench.test_file}"
            try:
                prompt = encode_family_prompt(
                    self.processor, self.box_convention, [("user", split_image_spans(sample.text))], where
                )
            except ValueError as e:
                raise UserError(f"{where}: {e}") from e
            rows.append(prompt.ids)
            prompts.append(prompt.text)
            images += prompt.images
            num_images.append(len(prompt.images))
            geometries.append(prompt.geometry)
            if self.bench.metric == "grounding":
                budget = grounding_answer_budget(
                    self.processor, self.box_convention, sample.text, prompt.geometry
                )
                max_new_tokens = max(max_new_tokens, budget)
            if self.bench.kind == "choice":
                option_ids.append(
                    [
                        tokenize_plain(
                            self.processor.tokenizer, option_continuation(letter, FAMILY_PROMPT_FORMAT)
                        )
                        for letter in sample.options
                    ]
                )
        input_ids, attention_mask = left_pad(rows, self.pad_id)
        pixel_values, grids = _pixels(self.processor, images)
        return FamilyPromptBatch(
            samples,
            prompts,
            input_ids,
            attention_mask,
            pixel_values,
            num_images,
            option_ids,
            self.pad_id,
            image_grid_thw=grids,
            geometries=geometries,
            max_new_tokens=max_new_tokens,
        )


@torch.no_grad()
def generate_family_answers(
    model, processor: ProcessorMixin, batch: FamilyPromptBatch, bench: Benchmark, device: torch.device
) -> list[tuple[str, str]]:
    """Greedy decoding of a batch: (answer for the metric, the family's own text) per sample."""
    tokenizer = processor.tokenizer
    stops = stop_token_ids(tokenizer, FAMILY_PROMPT_FORMAT)
    new_tokens = generate_tokens(
        model,
        batch.input_ids.to(device),
        batch.attention_mask.to(device),
        batch.pixel_values.to(device, model_dtype(model)),
        image_grid_thw=batch.image_grid_thw.to(device),
        max_new_tokens=batch.max_new_tokens,
        min_new_tokens=1,
        stop_ids=stops,
    )
    convention = base_vlm(model).spec.box_convention
    return [
        family_answer(tokenizer, row.tolist(), stops, convention, geometry)
        for row, geometry in zip(new_tokens.cpu(), batch.geometries, strict=True)
    ]


def _split_images(batch: FamilyPromptBatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sample: (its pixel rows, its grid rows)."""
    grids = torch.split(batch.image_grid_thw, batch.num_images)
    patches = torch.split(batch.pixel_values, [int(g.prod(-1).sum()) for g in grids])
    return list(zip(patches, grids, strict=True))


@torch.no_grad()
def rank_family_options(
    model, batch: FamilyPromptBatch, device: torch.device
) -> list[tuple[str, list[float]]]:
    """Per sample: (letter with the lowest mean cross-entropy over its tokens, per-option losses), as
    eval_mm.inference.rank_options. One row per option (prompt + option, left padded, with the sample's
    images), scored by the per-token log-probs of the model's forward over the option's tokens."""
    rows, labels, patches, grids, counts = [], [], [], [], []
    per_sample = zip(
        batch.input_ids, batch.attention_mask, _split_images(batch), batch.option_ids, strict=True
    )
    for prompt_ids, mask, (pixels, grid), options in per_sample:
        prompt = prompt_ids[mask.bool()].tolist()
        for option in options:
            rows.append(prompt + option)
            labels.append([IGNORE_INDEX] * len(prompt) + option)
            patches.append(pixels)
            grids.append(grid)
        counts.append(len(options))
    input_ids, attention_mask = left_pad(rows, batch.pad_id)
    label_rows, _ = left_pad(labels, IGNORE_INDEX)
    images = {}
    if len(batch.image_grid_thw):  # a text-only batch has no images to encode
        images = {
            "pixel_values": torch.cat(patches).to(device, model_dtype(model)),
            "image_grid_thw": torch.cat(grids).to(device),
        }
    out = model(
        input_ids.to(device),
        labels=label_rows.to(device),
        attention_mask=attention_mask.to(device),
        return_token_logps=True,
        **images,
    )
    scored = (label_rows != IGNORE_INDEX).sum(-1)
    losses = (-out.token_logps.sum(-1).cpu() / scored).tolist()
    ranked, row = [], 0
    for sample, n in zip(batch.samples, counts, strict=True):
        mine = losses[row : row + n]
        ranked.append((sample.options[min(range(n), key=mine.__getitem__)], mine))
        row += n
    return ranked


# ------------------------------------------------------------------------------------------ preference
class FamilyPairBatchBuilder:
    """Collate function: preference samples (``EvalSample.record``: conversations, chosen, rejected) -> padded
    rows chosen, rejected, chosen, ... in the family's tokens. Labels cover only the final answer (its content
    and end marker), as eval_mm.preference does for the Qwen-VL model."""

    def __init__(self, processor: ProcessorMixin, bench_name: str, box_convention: str):
        self.processor, self.bench_name, self.box_convention = processor, bench_name, box_convention

    def _pair(self, record: dict, where: str) -> list[tuple[FamilySample, dict]]:
        conversation = record["conversations"]
        prompt_turns = [(turn["from"], split_image_spans(turn["value"])) for turn in conversation]
        prompt = encode_family_prompt(self.processor, self.box_convention, prompt_turns, where)
        pixels = encode_images(self.processor, prompt.images)
        sizes = [image.size for image in prompt.images]
        pair = []
        for answer in (record["chosen"], record["rejected"]):
            answered = [*conversation, {"from": "assistant", "value": answer}]
            sample = encode_conversation(self.processor, answered, sizes, self.box_convention)
            if sample.input_ids[: len(prompt.ids)] != prompt.ids:
                raise ValueError("the chat template renders the prompt differently before an answer")
            sample.labels[: len(prompt.ids)] = [IGNORE_INDEX] * len(prompt.ids)
            pair.append((sample, pixels))
        return pair

    def __call__(self, samples: list[EvalSample]) -> dict[str, Any]:
        items = []
        for s in samples:
            where = f"{self.bench_name} sample {s.id}"
            try:
                items += self._pair(s.record, where)
            except ValueError as e:
                raise UserError(f"{where}: {e}") from e
        batch = collate_family_batch(items, self.processor.tokenizer.pad_token_id)
        batch["samples"] = samples
        return batch


@torch.no_grad()
def score_family_pairs(model, batch: dict[str, Any], device: torch.device) -> list[float]:
    """log p(chosen) - log p(rejected) per pair, each summed over the answer's labelled tokens."""
    images = {}
    if "pixel_values" in batch:
        images = {
            "pixel_values": batch["pixel_values"].to(device, model_dtype(model)),
            "image_grid_thw": batch["image_grid_thw"].to(device),
        }
    out = model(
        batch["input_ids"].to(device),
        labels=batch["labels"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        return_token_logps=True,
        **images,
    )
    logps = out.token_logps.sum(-1).view(-1, 2)
    return (logps[:, 0] - logps[:, 1]).tolist()
