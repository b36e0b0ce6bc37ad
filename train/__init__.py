"""Training: recipes (train.recipe), one loop (train.loop) over DDP / DeepSpeed ZeRO (train.parallel),
freezing (train.freeze), LoRA / Q-LoRA (train.lora), checkpoints and export (train.checkpoint).

Entry point: ``vlrecipe train RECIPE.yaml [section.key=value ...]`` (``python -m train``; docs/training.md).
"""
