"""What a training stage minimises, chosen in one place (``build_objective``), and how each micro-batch's
share is normalised over the optimiser step.

Per optimiser step the loop (train/loop.py ``accumulate_gradients``) asks the objective for its host-side
counts of the step's micro-batches (``count``), all-reduces them once with its own throughput counts, then
per micro-batch calls ``objective(engine, batch, counts)`` -> (the loss to back-propagate, a vector of
detached sums for the logs). At log time ``metrics(sums, counts)`` turns the window's all-reduced sums and
counts into numbers. ``counts`` is always the objective's own part of the all-reduced vector.

Both objectives normalise the same way: (sum of per-unit losses over every micro-batch and rank of the
step) / (number of units over all of them), the units being supervised tokens for language modelling and
pairs for DPO. Each micro-batch back-propagates its sum x world_size / the step's count (world_size undoes
the gradient mean over ranks that DDP and DeepSpeed apply). A mean of per-micro-batch means would
over-weight micro-batches with few units.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from models.loss import IGNORE_INDEX
from train.dpo import DirectPreference, build_reference
from train.parallel import Engine
from train.recipe import Recipe


class Objective(Protocol):
    runs_reference: bool  # a reference model's forward per micro-batch (counted in MFU)
    reference_encodes_images: bool  # ... with its own vision tower's encoding (not the policy's, shared)

    def count(self, batches: list[dict[str, Any]]) -> list[float]: ...

    def __call__(
        self, engine: Engine, batch: dict[str, Any], counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def metrics(self, sums: list[float], counts: list[float]) -> dict[str, float]: ...


def count_supervised(batch: dict[str, Any]) -> int:
    """Supervised tokens of a host-side batch (the model shifts: label 0 of a row is never used)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class LanguageModelling:
    """Next-token cross-entropy (pretrain, multitask, sft), token-weighted over the step."""

    runs_reference = False
    reference_encodes_images = False

    def count(self, batches: list[dict[str, Any]]) -> list[float]:
        return [sum(count_supervised(b) for b in batches)]

    def __call__(
        self, engine: Engine, batch: dict[str, Any], counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = engine.forward_loss(batch)
        scale = engine.dist.world_size / counts[0].clamp(min=1)  # stays on device: no sync
        return out.loss_sum * scale.to(out.loss_sum.dtype), out.loss_sum.detach().float().reshape(1)

    def metrics(self, sums: list[float], counts: list[float]) -> dict[str, float]:
        return {"loss": sums[0] / max(counts[0], 1)}


def build_objective(
    recipe: Recipe,
    engine: Engine,
    loader,
    frozen_reference: torch.nn.Module | None,
    pixel_dtype: torch.dtype | None,
    run_dir: Path,
) -> Objective:
    """The stage's objective: DPO for ``train.stage: dpo`` (with its reference model, train.dpo), next-token
    cross-entropy otherwise."""
    if recipe.train.stage != "dpo":
        return LanguageModelling()
    reference = build_reference(recipe, engine, loader, frozen_reference, pixel_dtype, run_dir)
    vision_adapters = recipe.lora.enabled and bool(recipe.lora.vision_targets)
    return DirectPreference(
        recipe.preference,
        reference,
        policy_vision_frozen=recipe.freeze.vision != "train" and not vision_adapters,
    )
