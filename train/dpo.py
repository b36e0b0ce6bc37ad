"""Direct preference optimisation (``train.stage: dpo``): the loss, its normalisation, the reference model.

A batch holds preference pairs as consecutive sequences (chosen, rejected; data.collate). The policy's
log-probability of an answer is the sum of its labelled tokens' log-probs (models.loss, one forward for
both sequences of every pair); the reference's comes from one of three places (``preference.reference``):

* ``adapter_disabled`` (LoRA): the same network inside peft's ``disable_adapter()``: no second copy;
* ``frozen_copy`` (full training): a frozen copy of the initial model, in eval mode, on every rank; under
  ZeRO-3 a second DeepSpeed engine without optimiser shards it like the policy;
* ``precomputed``: one pass over the data with the initial model before training, stored in
  ``OUT/reference_logps.safetensors`` (reused on resume) and looked up by the pairs' dataset indices.

The loss is TRL's (``DPOTrainer``): with margin m = (pi_c - pi_r) - (ref_c - ref_r),
``sigmoid``: -logsigmoid(beta m) (1 - ls) - logsigmoid(-beta m) ls; ``ipo``: (m - 1/(2 beta))^2, both on
summed log-probs (TRL length-normalises them for IPO; we do not). It is pair-weighted over the optimiser
step: (sum of pair losses over all micro-batches and ranks) / (number of pairs). ``sft_weight`` adds the
chosen answers' cross-entropy, token-weighted like SFT: (sum of their token NLLs) / (their token count),
both over the whole step (TRL's ``rpo_alpha``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.collate import to_device
from data.dataset import DataConfig
from data.sampler import ResumableSampler
from eval_mm.metrics import REWARD_MARGIN_TOLERANCE
from models.errors import UserError
from models.loading import base_vlm
from models.loss import IGNORE_INDEX, sum_per_sequence
from models.vlm import frozen_vision_shared
from train.parallel import Engine, LossOutputs, all_reduce_sum, barrier
from train.recipe import LoraSection, PreferenceSection, Recipe

REFERENCE_FILE = "reference_logps.safetensors"


# ----------------------------------------------------------------------------------------------- loss
def dpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    loss: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards beta * (policy - reference) of chosen and rejected answers."""
    margin = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    if loss == "sigmoid":
        losses = (
            -F.logsigmoid(beta * margin) * (1 - label_smoothing)
            - F.logsigmoid(-beta * margin) * label_smoothing
        )
    elif loss == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {loss!r}; expected sigmoid or ipo")
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def pairs_won(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """Per pair, whether the chosen answer's reward beats the rejected one's beyond float noise: the margin
    change (rewards / beta, in nats) must exceed eval_mm.metrics.REWARD_MARGIN_TOLERANCE, the tolerance the
    held-out reward accuracy uses as well."""
    return (chosen_rewards - rejected_rewards) / beta > REWARD_MARGIN_TOLERANCE


def pair_logps(token_logps: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """[pairs, 2]: summed log-probs of each pair's (chosen, rejected) answer tokens."""
    return sum_per_sequence(token_logps, batch["sequence_ids"], 2 * batch["num_pairs"]).view(-1, 2)


def count_chosen_tokens(batch: dict[str, Any]) -> int:
    """Supervised tokens of the chosen answers of a host-side batch (sequences 0, 2, 4, ...)."""
    sequence = batch["sequence_ids"][:, 1:]
    return int(((batch["labels"][:, 1:] != IGNORE_INDEX) & (sequence >= 0) & (sequence % 2 == 0)).sum())


class DirectPreference:
    """The DPO objective (train.objectives protocol): counts [pairs, chosen-answer tokens]; logs
    loss, rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected} (means over pairs)."""

    SUMS = (
        "pair_loss",
        "chosen_nll",
        "rewards_chosen",
        "rewards_rejected",
        "accuracies",
        "logps_chosen",
        "logps_rejected",
    )

    def __init__(self, cfg: PreferenceSection, reference, policy_vision_frozen: bool = True) -> None:
        self.cfg = cfg
        self.reference = reference
        self.runs_reference = not isinstance(reference, PrecomputedReference)  # a forward per step (FLOPs)
        # Its vision tower is the policy's (adapters off) or a copy of it: a frozen one encodes once for both.
        self.reference_encodes_images = self.runs_reference and not policy_vision_frozen

    def count(self, batches: list[dict[str, Any]]) -> list[float]:
        return [sum(b["num_pairs"] for b in batches), sum(count_chosen_tokens(b) for b in batches)]

    def __call__(
        self, engine: Engine, batch: dict[str, Any], counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pairs, chosen_tokens = counts[0].clamp(min=1), counts[1].clamp(min=1)
        # A frozen vision tower encodes the micro-batch's images once for the reference and the policy.
        with frozen_vision_shared(base_vlm(engine.model), *self.reference.vision_twins):
            with torch.no_grad():
                reference = self.reference(engine, batch)
            policy = pair_logps(engine.forward_loss(batch, token_logps=True).token_logps, batch)
        c = self.cfg
        losses, chosen_rewards, rejected_rewards = dpo_losses(
            policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], c.loss, c.beta, c.label_smoothing
        )
        world = engine.dist.world_size
        chosen_nll = -policy[:, 0].sum()
        loss = losses.sum() * (world / pairs).to(losses.dtype)
        if c.sft_weight:
            loss = loss + c.sft_weight * chosen_nll * (world / chosen_tokens).to(losses.dtype)
        won = pairs_won(chosen_rewards, rejected_rewards, c.beta)
        sums = (
            torch.stack(
                [
                    losses.sum(),
                    chosen_nll,
                    chosen_rewards.sum(),
                    rejected_rewards.sum(),
                    won.float().sum(),
                    policy[:, 0].sum(),
                    policy[:, 1].sum(),
                ]
            )
            .detach()
            .float()
        )
        return loss, sums

    def metrics(self, sums: list[float], counts: list[float]) -> dict[str, float]:
        s = dict(zip(self.SUMS, sums, strict=True))
        pairs, chosen_tokens = max(counts[0], 1), max(counts[1], 1)
        metrics = {"loss": s["pair_loss"] / pairs + self.cfg.sft_weight * s["chosen_nll"] / chosen_tokens}
        if self.cfg.sft_weight:
            metrics["nll/chosen"] = s["chosen_nll"] / chosen_tokens
        metrics.update(
            {
                "rewards/chosen": s["rewards_chosen"] / pairs,
                "rewards/rejected": s["rewards_rejected"] / pairs,
                "rewards/accuracies": s["accuracies"] / pairs,
                "rewards/margins": (s["rewards_chosen"] - s["rewards_rejected"]) / pairs,
                "logps/chosen": s["logps_chosen"] / pairs,
                "logps/rejected": s["logps_rejected"] / pairs,
            }
        )
        return metrics


# ------------------------------------------------------------------------------------------ reference
def reference_mode(preference: PreferenceSection, lora: LoraSection) -> str:
    """The preference section's reference, "auto" resolved: adapter_disabled with LoRA,
    frozen_copy otherwise."""
    if preference.reference == "auto":
        return "adapter_disabled" if lora.enabled else "frozen_copy"
    return preference.reference


def runs_adapter_off_reference(recipe: Recipe) -> bool:
    """Whether the reference pass runs the policy's own layers with the adapters off (train.perf keeps those
    layers uncompiled)."""
    return (
        recipe.train.stage == "dpo" and reference_mode(recipe.preference, recipe.lora) == "adapter_disabled"
    )


def copy_for_reference(model: nn.Module, recipe: Recipe) -> nn.Module | None:
    """The frozen copy of the initial model (frozen_copy only), taken before the engine wraps or shards the
    policy; it keeps the policy's runtime switches (attention kernel, loss implementation)."""
    if recipe.train.stage != "dpo" or reference_mode(recipe.preference, recipe.lora) != "frozen_copy":
        return None
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference.eval()


class AdapterDisabledReference:
    """The policy network with its LoRA adapter (and modules_to_save) switched off."""

    vision_twins: tuple[nn.Module, ...] = ()  # its vision tower is the policy's own

    def __call__(self, engine: Engine, batch: dict[str, Any]) -> torch.Tensor:
        with engine.model.disable_adapter():
            return pair_logps(engine.forward_loss(batch, token_logps=True).token_logps, batch)


class FrozenCopyReference:
    """A frozen copy: a module on this rank's device, or a DeepSpeed ZeRO-3 engine sharding it."""

    def __init__(self, module: nn.Module, zero3: bool = False) -> None:
        self.module = module
        # The copy's tower is the policy's frozen one (frozen_vision_shared: one encoding for both, where the
        # policy's tower is frozen); under ZeRO-3 the copy is an engine around LossOutputs around the model.
        self.vision_twins = (base_vlm(module.module.model if zero3 else module),)

    def __call__(self, engine: Engine, batch: dict[str, Any]) -> torch.Tensor:
        out = self.module(
            input_ids=batch["input_ids"],
            pixel_values=batch.get("pixel_values"),
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            labels=batch["labels"],
            cu_seq_lens=batch.get("cu_seq_lens"),
            max_length=batch.get("max_length"),
            image_index=batch.get("image_index"),
            return_token_logps=True,
        )
        return pair_logps(out[2] if isinstance(out, tuple) else out.token_logps, batch)


class PrecomputedReference:
    """Reference log-probs computed before training, looked up by the pairs' dataset indices."""

    vision_twins: tuple[nn.Module, ...] = ()

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table  # [records, 2] on the training device

    def __call__(self, engine: Engine, batch: dict[str, Any]) -> torch.Tensor:
        return self.table[batch["pair_index"]]


def place_frozen_copy(reference: nn.Module, engine: Engine) -> nn.Module:
    """The frozen copy where the policy runs: under ZeRO-3 a second engine (no optimiser) shards it the
    same way (as TRL prepares its reference model); otherwise a full copy on this rank's device, in the
    dtype the policy has (DeepSpeed bf16 models were built in bf16, train.assemble.storage_dtypes)."""
    if engine.mode != "zero3":
        return reference.to(engine.dist.device)
    import deepspeed

    wrapped = LossOutputs(reference)
    ref_engine, *_ = deepspeed.initialize(model=wrapped, config=engine.deepspeed_config)
    # VLM.forward reads lm_head.weight directly (fused loss): ZeRO-3 must gather it for the forward.
    deepspeed.zero.register_external_parameter(wrapped, reference.llm.get_output_embeddings().weight)
    ref_engine.eval()  # DeepSpeedEngine.eval returns None, unlike nn.Module.eval
    return ref_engine


def build_reference(
    recipe: Recipe,
    engine: Engine,
    loader,
    frozen_reference: nn.Module | None,
    pixel_dtype: torch.dtype | None,
    run_dir: Path,
):
    mode = reference_mode(recipe.preference, recipe.lora)
    if mode == "adapter_disabled":
        return AdapterDisabledReference()
    if mode == "frozen_copy":
        return FrozenCopyReference(place_frozen_copy(frozen_reference, engine), zero3=engine.mode == "zero3")
    return PrecomputedReference(load_or_precompute(recipe, engine, loader, pixel_dtype, run_dir))


# ------------------------------------------------------------------------------ precomputed log-probs
def _fingerprint(d: DataConfig, init_from: str | None, num_records: int) -> dict[str, str]:
    """What the stored log-probs depend on besides the weights: a file made for other data is refused."""
    fingerprint = {
        "records": str(num_records),
        "paths": json.dumps(list(d.paths)),
        "max_len": str(d.max_len),
        "system_message": d.system_message,
        "init_from": str(init_from),
    }
    if d.min_pixels is not None or d.max_pixels is not None:  # a family's image grids (so its tokens)
        fingerprint["pixels"] = f"{d.min_pixels}..{d.max_pixels}"
    return fingerprint


def load_or_precompute(
    recipe: Recipe, engine: Engine, loader, pixel_dtype: torch.dtype | None, run_dir: Path
) -> torch.Tensor:
    """[records, 2] reference log-probs on the device: read from ``run_dir/reference_logps.safetensors``,
    or computed now, while the model still holds its initial weights (before any resume), and stored."""
    path = run_dir / REFERENCE_FILE
    fingerprint = _fingerprint(recipe.data, recipe.model.init_from, len(loader.dataloader.dataset))
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                stored = f.metadata()
                table = f.get_tensor("logps")
        except SafetensorError as e:
            raise UserError(
                f"{path}: cannot read the stored reference log-probs (corrupt or incomplete?): "
                f"{e}; delete it to compute it again"
            ) from e
        if stored != fingerprint:
            raise UserError(
                f"{path} was computed for other data or another model ({stored}, now {fingerprint}); "
                "delete it to compute it again, or use another checkpoint.out_dir"
            )
        return table.to(engine.dist.device)
    table = precompute_reference_logps(engine, loader, pixel_dtype)
    if engine.dist.is_main:
        tmp = path.with_suffix(".tmp")
        save_file({"logps": table.cpu().contiguous()}, str(tmp), metadata=fingerprint)
        tmp.replace(path)  # atomic: a run killed while writing leaves no half file
    barrier()
    return table


@torch.no_grad()
def precompute_reference_logps(engine: Engine, loader, pixel_dtype: torch.dtype | None) -> torch.Tensor:
    """One pass over every pair with the model as it is now (the reference), in eval mode, data-parallel:
    rank r takes every world_size-th pair (padded so every rank runs as many forwards: ZeRO-3's forwards
    are collective). Returns [records, 2] on every rank (NaN for pairs dropped for a bad image)."""
    info = engine.dist
    dataset = loader.dataloader.dataset
    sampler = ResumableSampler(len(dataset), rank=info.rank, world_size=info.world_size, shuffle=False)
    order = DataLoader(
        dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        collate_fn=loader.dataloader.collate_fn,
        num_workers=loader.dataloader.num_workers,
    )
    table = torch.zeros(len(dataset), 2, device=info.device)
    seen = torch.zeros(len(dataset), device=info.device)
    engine.eval()
    for batch in tqdm(order, desc="reference log-probs", disable=not info.is_main):
        batch.pop("_stats")
        loader.count_bad_images(batch.pop("_bad_images", ()))  # max_bad_images holds here too
        if batch["num_samples"] == 0:  # every pair of the batch dropped for a bad image
            if engine.mode == "zero3":
                raise RuntimeError(
                    "a batch of the reference pass lost all its pairs to bad images; under ZeRO-3 "
                    "the ranks would fall out of step: fix the images or use frozen_copy"
                )
            continue
        batch = to_device(batch, info.device, pixel_dtype)
        with engine.autocast():
            logps = pair_logps(engine.forward_loss(batch, token_logps=True).token_logps, batch)
        table.index_add_(0, batch["pair_index"], logps.float())
        seen.index_add_(0, batch["pair_index"], torch.ones_like(logps[:, 0], dtype=seen.dtype))
    engine.train()
    table, seen = all_reduce_sum(table), all_reduce_sum(seen)  # padding repeats some pairs: average them
    return table / seen[:, None]
