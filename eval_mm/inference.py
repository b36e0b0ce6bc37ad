"""Batched model calls: greedy generation and likelihood ranking of option letters.

Batches are built in DataLoader workers (tokenising and image decoding), left-padded so every prompt
ends at the same column, which is what both KV-cache generation and "score the last tokens" need.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    input_ids: torch.Tensor  # [rows, L], left padded
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor  # [num_images, 3, S, S] in row order
    option_lengths: list[list[int]]  # per sample, per option: number of scored tokens (choice only)


class BatchBuilder:
    """Collate function: samples -> PromptBatch. One row per sample (generate) or per option (choice)."""

    def __init__(self, tokenizer, bench: Benchmark, prompt_format: str, num_image_tokens: int, image_size: int):
        self.tokenizer, self.bench, self.prompt_format = tokenizer, bench, prompt_format
        self.num_image_tokens, self.image_size = num_image_tokens, image_size
        self.pad_id = pad_token_id(tokenizer)

    def __call__(self, samples: list[EvalSample]) -> PromptBatch:
        rows: list[list[int]] = []
        images: list[torch.Tensor] = []
        prompts, option_lengths = [], []
        for sample in samples:
            ids, paths = encode_prompt(self.tokenizer, sample.text, self.num_image_tokens, self.prompt_format)
            pixels = [load_image(p, self.image_size, where=f"{self.bench.name} sample {sample.id}") for p in paths]
            prompts.append(prompt_text(sample.text, self.prompt_format))
            if self.bench.kind == "choice":
                targets = [tokenize_plain(self.tokenizer, option_continuation(letter, self.prompt_format))
                           for letter in sample.options]
                rows += [ids + t for t in targets]
                images += pixels * len(targets)
                option_lengths.append([len(t) for t in targets])
            else:
                rows.append(ids)
                images += pixels
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row):] = torch.tensor(row)
            attention_mask[i, width - len(row):] = 1
        pixel_values = torch.stack(images) if images else torch.zeros(0, 3, self.image_size, self.image_size)
        return PromptBatch(samples, prompts, input_ids, attention_mask, pixel_values, option_lengths)


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


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


@torch.no_grad()
def generate_answers(model, tokenizer, batch: PromptBatch, bench: Benchmark, prompt_format: str,
                     device: torch.device) -> list[str]:
    """Greedy decoding with the KV cache; returns the decoded new text per sample (stripped)."""
    stops = stop_token_ids(tokenizer, prompt_format)
    # The reference's minimum lengths are for its raw base-model prompts. A chat model ends its turn with
    # <|im_end|>; forcing more tokens makes it write past the end of its answer, so ChatML asks for 1.
    min_new_tokens = bench.min_new_tokens if prompt_format == "raw" else 1
    new_tokens = model.generate(
        batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        pixel_values=batch.pixel_values.to(device, _model_dtype(model)),
        do_sample=False,
        num_beams=1,
        max_new_tokens=bench.max_new_tokens,
        min_new_tokens=min_new_tokens,
        pad_token_id=stops[0],
        eos_token_id=stops,
        use_cache=True,
    )
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_tokens.cpu()]


@torch.no_grad()
def rank_options(model, batch: PromptBatch, device: torch.device) -> list[tuple[str, list[float]]]:
    """Per sample: (letter with the lowest mean cross-entropy over its tokens, per-option losses).

    One forward over every option of every sample (the reference's method). Position ids follow the
    attention mask so a left-padded row scores exactly like an unpadded one.
    """
    input_ids = batch.input_ids.to(device)
    attention_mask = batch.attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids[:, :-1], pixel_values=batch.pixel_values.to(device, _model_dtype(model)),
                   attention_mask=attention_mask[:, :-1], position_ids=position_ids[:, :-1]).logits
    # Only the last max_len positions can be option tokens; slicing first keeps the fp32 copy small.
    max_len = max(n for lengths in batch.option_lengths for n in lengths)
    token_losses = F.cross_entropy(logits[:, -max_len:].float().transpose(1, 2), input_ids[:, -max_len:],
                                   reduction="none").cpu()
    results, row = [], 0
    for sample, lengths in zip(batch.samples, batch.option_lengths, strict=True):
        losses = [token_losses[row + i, max_len - n:].mean().item() for i, n in enumerate(lengths)]
        row += len(lengths)
        best = min(range(len(losses)), key=losses.__getitem__)  # first minimum, like argmin
        results.append((sample.options[best], losses))
    return results
