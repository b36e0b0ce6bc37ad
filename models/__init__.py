"""VLM = vision tower + position-aware resampler + any Hugging Face causal LM (Qwen-VL recipe).

The names below are imported on first use (PEP 562), so that light modules such as ``models.errors`` and
``models.tokens`` load without torch and transformers: every CLI imports ``models.errors``, and a mistake in
its command line is reported in a fraction of a second.
"""

import importlib

_EXPORTS = {
    "VLM": "models.vlm",
    "VLMOutput": "models.vlm",
    "VLMConfig": "models.config",
    "VisionConfig": "models.config",
    "ResamplerConfig": "models.config",
    "build_vlm": "models.build",
    "load_tokenizer": "models.build",
    "load_vlm": "models.build",
    "load_pretrained": "models.loading",
    "presets": "models.presets",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    return module if name == "presets" else getattr(module, name)


__all__ = list(_EXPORTS)
