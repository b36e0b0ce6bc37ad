"""VLM = vision tower + position-aware resampler + any Hugging Face causal LM (Qwen-VL recipe)."""

from models import presets
from models.build import build_vlm, load_tokenizer
from models.config import ResamplerConfig, VisionConfig, VLMConfig
from models.loading import load_pretrained
from models.vlm import VLM, VLMOutput

__all__ = [
    "VLM",
    "VLMOutput",
    "VLMConfig",
    "VisionConfig",
    "ResamplerConfig",
    "build_vlm",
    "load_tokenizer",
    "load_pretrained",
    "presets",
]
