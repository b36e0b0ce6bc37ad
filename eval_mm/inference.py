"""Batched model calls: greedy generation and likelihood ranking of option letters.

Batches are built in DataLoader workers (tokenising and image decoding), one row per sample, left-padded
so every prompt ends at the same column, which is what both KV-cache generation and "score what follows
the prompt" need. Every image of a batch goes through one vision forward (VLM.embed).

What makes it fast (docs/evaluation.md, measured by `python -m eval_mm.bench_throughput`):
- multiple choice encodes each prompt (image + question) once and scores every option from its KV cache,
  instead of one full row, with its own copy of the image, per option (the reference's method, kept here
  as `rank_options_per_row`: the benchmark's anchor and the equivalence tests' reference);
- generation can reuse one transformers StaticCache across batches (`StaticCacheSlot`): on CUDA,
  transformers' generate then runs its decode step through torch.compile with CUDA graphs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import StaticCache

from data.images import load_image
from data.text import tokenize_plain
from eval_mm.benchmarks import Benchmark
from eval_mm.datasets import EvalSample
from eval_mm.prompts import encode_prompt, option_continuation, prompt_text
from models.tokens import ENDOFTEXT, IM_END, IM_START


@dataclass
class PromptBatch:
    samples: list[EvalSample]
    prompts: list[str]  # the prompt text as the model saw it (decoded ids, image slots collapsed)
    input_ids: torch.Tensor  # [samples, L] prompts, left padded
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor  # [num_images, 3, S, S], in row order
    num_images: list[int]  # per sample
    option_ids: list[
        list[list[int]]
    ]  # per sample, per option: the token ids scored after the prompt (choice)
    pad_id: int  # the token left padding is made of

    def pin_memory(self) -> PromptBatch:
        """Called by DataLoader(pin_memory=True) in its pinning thread: page-locked tensors copy to the GPU
        asynchronously (non_blocking=True below)."""
        self.input_ids, self.attention_mask = self.input_ids.pin_memory(), self.attention_mask.pin_memory()
        self.pixel_values = self.pixel_values.pin_memory()
        return self


class BatchBuilder:
    """Collate function: samples -> PromptBatch (one row per sample; for choice also each option's ids)."""

    def __init__(
        self, tokenizer, bench: Benchmark, prompt_format: str, num_image_tokens: int, image_size: int
    ):
        self.tokenizer, self.bench, self.prompt_format = tokenizer, bench, prompt_format
        self.num_image_tokens, self.image_size = num_image_tokens, image_size
        self.pad_id = pad_token_id(tokenizer)

    def __call__(self, samples: list[EvalSample]) -> PromptBatch:
        rows: list[list[int]] = []
        images: list[torch.Tensor] = []
        prompts, num_images, option_ids = [], [], []
        for sample in samples:
            ids, paths = encode_prompt(self.tokenizer, sample.text, self.num_image_tokens, self.prompt_format)
            where = f"{self.bench.name} sample {sample.id} of {self.bench.test_file}"
            images += [load_image(p, self.image_size, where=where) for p in paths]
            rows.append(ids)
            num_images.append(len(paths))
            prompts.append(prompt_text(sample.text, self.prompt_format))
            if self.bench.kind == "choice":
                option_ids.append(
                    [
                        tokenize_plain(self.tokenizer, option_continuation(letter, self.prompt_format))
                        for letter in sample.options
                    ]
                )
        input_ids, attention_mask = left_pad(rows, self.pad_id)
        pixel_values = torch.stack(images) if images else torch.zeros(0, 3, self.image_size, self.image_size)
        return PromptBatch(
            samples, prompts, input_ids, attention_mask, pixel_values, num_images, option_ids, self.pad_id
        )


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (input_ids, attention_mask) [rows, longest], padded on the left."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


def pad_token_id(tokenizer) -> int:
    """The reference pads and stops with <|endoftext|>."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.convert_tokens_to_ids(ENDOFTEXT)


def stop_token_ids(tokenizer, prompt_format: str) -> list[int]:
    """<|endoftext|>; for ChatML also <|im_end|> and <|im_start|> (the reference's chat stop words)."""
    ids = [pad_token_id(tokenizer)]
    if prompt_format == "chatml":
        vocab = tokenizer.get_vocab()
        ids += [vocab[IM_END], vocab[IM_START]]
    return ids


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype inputs are cast to: the model's first parameter's."""
    return next(model.parameters()).dtype


def batch_to_device(
    batch: PromptBatch, model, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, pixel_values in the model's dtype) on `device`;
    asynchronous from pinned memory."""
    return (
        batch.input_ids.to(device, non_blocking=True),
        batch.attention_mask.to(device, non_blocking=True),
        batch.pixel_values.to(device, non_blocking=True).to(model_dtype(model)),
    )


# ------------------------------------------------------------------------------------------ generation
class StaticCacheSlot:
    """One transformers StaticCache reused by every batch of a run, reset in between.

    With a StaticCache, transformers' generate() compiles its decode step (torch.compile, mode
    "reduce-overhead": CUDA graphs) on CUDA. CUDA graphs replay only while the cache tensors keep their
    addresses and shapes, so the cache is made once, for a fixed number of rows (short batches are padded
    with dummy rows, see `generate_tokens`) and a length rounded up to `LENGTH_STEP`; a longer batch makes
    a new one (one recompile). Prompts sorted longest first (runner) make the first batch the longest.
    On CPU nothing is compiled: the static cache alone gives the same tokens as the dynamic one.
    """

    LENGTH_STEP = 64

    def __init__(self, llm_config, rows: int):
        self.llm_config, self.rows = llm_config, rows
        self.cache, self.length = None, 0

    def for_length(self, length: int):
        if self.cache is None or length > self.length:
            self.length = -(-length // self.LENGTH_STEP) * self.LENGTH_STEP
            self.cache = StaticCache(config=self.llm_config, max_cache_len=self.length)
        else:
            self.cache.reset()  # zeroes the tensors in place: same addresses
        return self.cache


def generate_tokens(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    *,
    max_new_tokens: int,
    min_new_tokens: int,
    stop_ids: list[int],
    static_cache: StaticCacheSlot | None = None,
    image_grid_thw: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy decoding with the KV cache (tensors already on the model's device) -> new tokens [rows, T].

    static_cache: reuse that StaticCache (see StaticCacheSlot); the batch is padded up to its row count with
    dummy rows (one unmasked pad token, no image) whose outputs are dropped. None: transformers' default
    dynamic cache, nothing compiled. Both give the same tokens. image_grid_thw: each image's patch grid, for
    a family model (HFFamilyModel.generate), whose images are rows of patches.
    """
    rows = input_ids.shape[0]
    kwargs = {} if image_grid_thw is None else {"image_grid_thw": image_grid_thw}
    if static_cache is not None:
        if rows > static_cache.rows:
            raise ValueError(f"batch of {rows} rows > the static cache's {static_cache.rows}")
        dummies = static_cache.rows - rows
        if dummies:
            input_ids = torch.cat([input_ids, input_ids.new_full((dummies, input_ids.shape[1]), stop_ids[0])])
            attention_mask = torch.cat(
                [attention_mask, attention_mask.new_zeros(dummies, attention_mask.shape[1])]
            )
            attention_mask[rows:, -1] = 1
        kwargs["past_key_values"] = static_cache.for_length(input_ids.shape[1] + max_new_tokens)
    new_tokens = model.generate(
        input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        pad_token_id=stop_ids[0],
        eos_token_id=stop_ids,
        use_cache=True,
        **kwargs,
    )
    return new_tokens[:rows]


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    batch: PromptBatch,
    bench: Benchmark,
    prompt_format: str,
    device: torch.device,
    static_cache: StaticCacheSlot | None = None,
) -> list[str]:
    """Greedy decoding with the KV cache; returns the decoded new text per sample (stripped)."""
    # The reference's minimum lengths are for its raw base-model prompts. A chat model ends its turn with
    # <|im_end|>; forcing more tokens makes it write past the end of its answer, so ChatML asks for 1.
    min_new_tokens = bench.min_new_tokens if prompt_format == "raw" else 1
    input_ids, attention_mask, pixel_values = batch_to_device(batch, model, device)
    new_tokens = generate_tokens(
        model,
        input_ids,
        attention_mask,
        pixel_values,
        max_new_tokens=bench.max_new_tokens,
        min_new_tokens=min_new_tokens,
        stop_ids=stop_token_ids(tokenizer, prompt_format),
        static_cache=static_cache,
    )
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_tokens.cpu()]


# ------------------------------------------------------------------------------------------ multiple choice
def _choose(samples: list[EvalSample], losses: list[list[float]]) -> list[tuple[str, list[float]]]:
    """(letter with the lowest loss, losses) per sample; the first minimum on ties, like argmin."""
    return [
        (sample.options[min(range(len(row)), key=row.__getitem__)], row)
        for sample, row in zip(samples, losses, strict=True)
    ]


@torch.no_grad()
def rank_options(model, batch: PromptBatch, device: torch.device) -> list[tuple[str, list[float]]]:
    """Per sample: (letter with the lowest mean cross-entropy over its tokens, per-option losses).

    Each prompt is encoded once (one image copy, one prefill). Its last position predicts every option's
    first token. Options of several tokens continue from the prompt's KV cache: for each option index, one
    short forward of that option's tokens over a copy of the cache (one extra copy at a time, not one per
    option). Position ids follow the attention mask, so a left-padded row scores exactly like an unpadded
    one, and the losses equal `rank_options_per_row`'s to float rounding.
    """
    input_ids, attention_mask, pixel_values = batch_to_device(batch, model, device)
    decoder, lm_head = model.llm.get_decoder(), model.llm.get_output_embeddings()
    longest = max(len(ids) for options in batch.option_ids for ids in options)
    if min(len(ids) for options in batch.option_ids for ids in options) == 0:
        raise ValueError("an option continuation tokenised to no tokens; nothing to score")
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = decoder(
        inputs_embeds=model.embed(input_ids, pixel_values),
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=longest > 1,
    )
    first_logits = lm_head(
        out.last_hidden_state[:, -1]
    ).float()  # [samples, V]: the logits of the first option token

    # token_losses[k][i, j]: cross-entropy of token j of option k of sample i (0 where it has none).
    num_samples, max_options = len(batch.samples), max(len(o) for o in batch.option_ids)
    token_losses, counts = [], torch.zeros(num_samples, max_options, dtype=torch.long)
    prompt_lengths = attention_mask.sum(-1, keepdim=True)
    for k in range(max_options):
        option = [options[k] if k < len(options) else [] for options in batch.option_ids]
        counts[:, k] = torch.tensor([len(ids) for ids in option])
        targets = torch.tensor([ids + [0] * (longest - len(ids)) for ids in option], device=device)
        first = F.cross_entropy(first_logits, targets[:, 0], reduction="none")
        if longest == 1:
            token_losses.append(first[:, None])
            continue
        # Tokens 0..n-2 of option k go in after the prompt (right-padded), predicting tokens 1..n-1.
        inputs = targets[:, :-1]
        inputs_mask = (torch.arange(longest - 1) < counts[:, k : k + 1] - 1).to(device, attention_mask.dtype)
        hidden = decoder(
            inputs_embeds=model.llm.get_input_embeddings()(inputs),
            attention_mask=torch.cat([attention_mask, inputs_mask], dim=1),
            position_ids=prompt_lengths + torch.arange(longest - 1, device=device),
            past_key_values=copy.deepcopy(out.past_key_values),
            use_cache=True,
        ).last_hidden_state
        rest = F.cross_entropy(lm_head(hidden).float().transpose(1, 2), targets[:, 1:], reduction="none")
        token_losses.append(torch.cat([first[:, None], rest], dim=1))
    losses = torch.stack(token_losses, dim=1)  # [samples, options, longest]
    counts = counts.to(device)
    scored = torch.arange(longest, device=device) < counts[..., None]
    means = losses.masked_fill(~scored, 0.0).sum(-1) / counts.clamp(min=1)
    means = means.tolist()  # the one device->host copy
    return _choose(
        batch.samples, [row[: len(options)] for row, options in zip(means, batch.option_ids, strict=True)]
    )


@torch.no_grad()
def rank_options_per_row(model, batch: PromptBatch, device: torch.device) -> list[tuple[str, list[float]]]:
    """The reference's method, kept as the anchor of bench_throughput and of the equivalence tests: one
    row per option (prompt + option tokens, left padded, each with its own copy of the sample's images),
    one forward over all rows, mean cross-entropy over each option's tokens."""
    rows, images, lengths = [], [], []
    image_rows = torch.split(batch.pixel_values, batch.num_images)
    for prompt_ids, mask, pixels, options in zip(
        batch.input_ids, batch.attention_mask, image_rows, batch.option_ids, strict=True
    ):
        prompt = prompt_ids[mask.bool()].tolist()
        rows += [prompt + ids for ids in options]
        images += [pixels] * len(options)
        lengths.append([len(ids) for ids in options])
    input_ids, attention_mask = left_pad(rows, batch.pad_id)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    pixel_values = torch.cat(images).to(device, model_dtype(model))
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids[:, :-1],
        pixel_values=pixel_values,
        attention_mask=attention_mask[:, :-1],
        position_ids=position_ids[:, :-1],
    ).logits
    # Only the last max_len positions can be option tokens; slicing first keeps the fp32 copy small.
    max_len = max(n for row in lengths for n in row)
    token_losses = F.cross_entropy(
        logits[:, -max_len:].float().transpose(1, 2), input_ids[:, -max_len:], reduction="none"
    ).cpu()
    losses, row = [], 0
    for sample_lengths in lengths:
        losses.append(
            [token_losses[row + i, max_len - n :].mean().item() for i, n in enumerate(sample_lengths)]
        )
        row += len(sample_lengths)
    return _choose(batch.samples, losses)
