"""Hugging Face VLM families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) trained by the same recipe as the Qwen-VL model.

``specs``: what differs between families (classes, conventions, presets); ``adapter``: `HFFamilyModel`, the
model with its parts, image placeholder and position ids named; ``processor``: the family's tokenizer and
processor, built offline or loaded from a released directory. docs/model.md "Adding a model family".
"""
