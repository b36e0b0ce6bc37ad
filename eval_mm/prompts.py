"""Prompt text -> token ids, raw (base checkpoints, the reference's eval prompts) or ChatML (chat/SFT)."""

import json
from pathlib import Path

from data.chatml import DEFAULT_SYSTEM_MESSAGE, encode_chat_prompt
from data.text import encode_text_with_images
from models.families.specs import FAMILIES
from models.tokens import IM_END, IM_START

FAMILY_MODEL_TYPES = {spec.model_type for spec in FAMILIES.values()}


def checkpoint_prompt_format(checkpoint: str | Path) -> str:
    """'chatml' when the checkpoint says it is a chat model, else 'raw'.

    Looked up, in order: `chat_format` in generation_config.json (where Qwen-VL-Chat records it) or
    config.json; a `stage`/`training_stage` of 'sft' or 'chat' in either file. Absent -> 'raw'.
    A Hugging Face family export (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) is always 'chatml': its chat template."""
    config_file = Path(checkpoint) / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text()).get("model_type") in FAMILY_MODEL_TYPES:
        return "chatml"
    for name in ("generation_config.json", "config.json"):
        file = Path(checkpoint) / name
        if not file.is_file():
            continue
        config = json.loads(file.read_text())
        if config.get("chat_format"):
            return "chatml" if config["chat_format"] == "chatml" else "raw"
        stage = config.get("stage") or config.get("training_stage")
        if stage in ("sft", "chat"):
            return "chatml"
    return "raw"


def encode_prompt(
    tokenizer,
    text: str,
    num_image_tokens: int,
    prompt_format: str,
    system_message: str = DEFAULT_SYSTEM_MESSAGE,
) -> tuple[list[int], list[str]]:
    """Token ids of the prompt (ending where the model's answer starts) and the image paths in order.

    ChatML goes through data.chatml, so prompts are tokenised exactly as training conversations:
    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n
    """
    if prompt_format == "raw":
        return encode_text_with_images(tokenizer, text, num_image_tokens)
    if prompt_format != "chatml":
        raise ValueError(f"prompt format must be 'raw' or 'chatml', got {prompt_format!r}")
    return encode_chat_prompt(tokenizer, text, num_image_tokens, system_message)


def option_continuation(letter: str, prompt_format: str) -> str:
    """Text scored after the prompt for one option: ' A' after the raw 'Answer:' (the reference), 'A' as
    the start of a ChatML assistant turn."""
    return " " + letter if prompt_format == "raw" else letter


def prompt_text(text: str, prompt_format: str, system_message: str = DEFAULT_SYSTEM_MESSAGE) -> str:
    """The prompt as a string (what encode_prompt tokenises), for the predictions file."""
    if prompt_format == "raw":
        return text
    return (
        f"{IM_START}system\n{system_message}{IM_END}\n{IM_START}user\n{text}{IM_END}\n{IM_START}assistant\n"
    )
