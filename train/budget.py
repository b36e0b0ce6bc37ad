"""``train.memory_budget``: the fastest activation setting whose planned peak fits a memory budget.

The shipped recipes used to carry one setting tuned to ~24 GiB (every decoder layer checkpointed, the
checkpointed inputs parked on the host), on every card. With a budget, the trainer (and ``python -m
train.plan``) asks the calibrated planner (train/memory.py) for each candidate's peak and keeps the cheapest
one that fits. The settings chosen are those the recipe leaves at ``auto``:

- ``perf.checkpoint_llm_layers``: how many decoder layers recompute their forward in backward (spread evenly
  over the depth, models.decoder_layers.checkpointed_layer_indices);
- ``perf.offload_activations``: the checkpointed layers' inputs wait in pinned host memory (train.offload);
- ``train.max_forward_tokens``: how many whole rows one forward/backward pass holds;
- ``perf.checkpoint_vision``: whether the resampler (and a vision tower that gradient runs through) is
  checkpointed too. A Hugging Face family's merger is never checkpointed (transformers' blocks are the
  checkpointed units): there the setting is a choice only when gradient runs through the vision tower.

A Hugging Face family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) honours all four: HFFamilyModel's
set_gradient_checkpointing takes the layer count and the vision switch, train.offload and
train.max_forward_tokens work on any model. It is planned at its largest image (train.memory.ModelShape, from
data.max_pixels).

A setting the recipe gives a value keeps it, and the log line marks it "(set)".

The cost model (``extra_seconds``) is the time a step spends on what the memory saving costs, nothing else:
- recompute: the FLOPs the checkpointed parts run a second time (train.flops.recompute_flops: a decoder
  layer's linears without the down projection where models.decoder_layers leaves it outside the checkpoint,
  its LoRA adapters, its attention; the resampler's forward per image, the vision tower's when it is
  checkpointed), at the rate the H100 profiles measured for the step's matrix products (docs/benchmarks.md);
- offload: the copies run on side streams, overlapped with compute; what they cost the step was measured
  (1-1.5% of a step, ~5 ms per GiB parked). Only considered with every decoder layer checkpointed: a layer
  that keeps its whole activations (~150 KB per token) would park them over PCIe, slower than recomputing it.
- forward size: fewer, larger passes cost no modelled time (the same FLOPs); between settings of equal cost
  the one with fewer passes wins, never at the price of more recompute.
Pure: inputs -> ``BudgetChoice`` (train.plan wires it to a recipe; the trainer decides on rank 0).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from models.decoder_layers import checkpointed_layer_indices
from train.flops import RecomputeFlops
from train.memory import Counts, Dims, GiB, MicroBatch, Setup, estimate, residual_bytes
from train.recipe import Recipe

AUTO = "auto"
MATMUL_FLOPS_PER_S = 640e12  # the step's matrix products on one H100 (profiles in docs/benchmarks.md)
OFFLOAD_S_PER_GIB = 0.005  # LoRA 2048: +32 ms a step for 8 GiB parked; world: +8.6 ms for 1.5 GiB
# tests/test_train_plan.py holds the plan within this of every GPU measurement: a step whose peak exceeds
# its planned peak by more says the calibration needs a look.
PLAN_ERROR = 0.15
# The recipe fields the choice fills, by the name a setting has here.
FIELDS = {
    "checkpointed_layers": "perf.checkpoint_llm_layers",
    "offload": "perf.offload_activations",
    "checkpoint_vision": "perf.checkpoint_vision",
    "max_forward_tokens": "train.max_forward_tokens",
}


@dataclass(frozen=True)
class Settings:
    checkpointed_layers: int | None  # None: every layer (as without a budget)
    offload: bool
    checkpoint_vision: bool
    max_forward_tokens: int | None  # None: the whole micro-batch in one pass


@dataclass(frozen=True)
class BudgetChoice:
    budget_gib: float
    how: str  # where the budget comes from, for the line
    settings: Settings
    layers: int  # decoder layers
    pass_tokens: int  # tokens of the largest forward pass planned
    planned_peak_gib: float  # the plan's process peak (what the trainer's peak_mem_gib measures)
    fits: bool
    fixed: tuple[str, ...] = ()  # the settings the recipe set (names of Settings' fields)
    vision_grad: bool = False  # gradient runs through the vision tower (it trains or has adapters)
    # what perf.checkpoint_vision covers, for the line ("" where it is no choice: a family's frozen ViT)
    vision_part: str = "resampler"
    extra_seconds: float = 0.0  # modelled cost per step of the recompute and offload chosen
    checkpointing: bool = (
        True  # train.grad_checkpointing: without it nothing is recomputed whatever the settings
    )

    @property
    def checkpointed_indices(self) -> list[int]:
        return sorted(checkpointed_layer_indices(self.layers, self.settings.checkpointed_layers))

    @property
    def line(self) -> str:
        s = self.settings

        def mark(name: str) -> str:
            return " (set)" if name in self.fixed else ""

        k = s.checkpointed_layers
        layers = f"{k} of {self.layers} decoder layers checkpointed"
        if 0 < k < self.layers:  # name the shorter list
            chosen = self.checkpointed_indices
            kept = [i for i in range(self.layers) if i not in chosen]
            layers += (
                f" (layers {', '.join(map(str, chosen))})"
                if len(chosen) <= len(kept)
                else f" (all but {', '.join(map(str, kept))})"
            )
        forwards = (
            f"forwards of {s.max_forward_tokens} tokens"
            if s.max_forward_tokens is not None
            else "one forward per micro-batch"
        )
        parts = [
            layers + mark("checkpointed_layers"),
            ("offload" if s.offload else "no offload") + mark("offload"),
            f"{self.vision_part} {'' if s.checkpoint_vision else 'not '}checkpointed"
            + mark("checkpoint_vision"),
            forwards + mark("max_forward_tokens"),
        ]
        if not self.checkpointing:
            parts[:3] = ["no activation checkpointing (train.grad_checkpointing: false)"]
        elif not self.vision_part:
            del parts[2]
        verdict = "" if self.fits else " > the budget: no setting fits, this is the one that needs least"
        return (
            f"memory budget {self.budget_gib:.1f} GiB ({self.how}): {', '.join(parts)}; "
            f"planned peak {self.planned_peak_gib:.1f} GiB{verdict}"
        )

    def peak_warning(self, measured_gib: float) -> str | None:
        """One warning line when a measured peak exceeds the planned one by more than the planner's error."""
        if measured_gib <= self.planned_peak_gib * (1 + PLAN_ERROR):
            return None
        return (
            f"warning: peak memory {measured_gib:.1f} GiB "
            f"exceeds the planned {self.planned_peak_gib:.1f} GiB "
            f"by {measured_gib / self.planned_peak_gib - 1:.0%} (more than the planner's {PLAN_ERROR:.0%}): "
            f"train/plan_calibration.json needs this run (python -m train.plan shows the plan)"
        )


def extra_seconds(
    settings: Settings,
    setup: Setup,
    dims: Dims,
    counts: Counts,
    rates: RecomputeFlops,
    batch: MicroBatch,
    tokens_per_sample: float,
) -> float:
    """Modelled seconds per step that ``settings`` spend on recompute and offload (module docstring)."""
    tokens = batch.tokens * setup.grad_accum
    samples = batch.samples * setup.grad_accum
    images = batch.images * setup.grad_accum
    per_layer = rates.layer_per_token + 2 * counts.lora / dims.layers  # adapters' forward: 2 per weight
    # models.decoder_layers (the Qwen-VL model's, not a family's: Dims.mergers) keeps a frozen down
    # projection that autocast does not cast out of the checkpoint
    down_outside = (
        not dims.mergers
        and not setup.llm_trains
        and dims.ffn not in setup.lora_inputs
        and (setup.frozen_bf16 or setup.deepspeed or setup.quantized)
    )
    per_layer -= rates.down_projection_per_token if down_outside else 0
    layers = settings.checkpointed_layers if setup.grad_checkpointing else 0
    flops = layers * (tokens * per_layer + samples * tokens_per_sample**2 * rates.attention_per_layer_pair)
    if setup.grad_checkpointing and settings.checkpoint_vision:
        grad_reaches_vision = setup.vision_trains or bool(setup.vision_lora_inputs)
        if grad_reaches_vision or (setup.resampler_trains and not dims.mergers):  # mergers: never recomputed
            flops += images * rates.resampler_per_image
        if grad_reaches_vision:
            flops += images * rates.vision_per_image
    parked = tokens * layers * dims.hidden * residual_bytes(setup) if settings.offload else 0
    return flops / MATMUL_FLOPS_PER_S + parked / GiB * OFFLOAD_S_PER_GIB


def candidates(
    fixed: dict[str, object],
    layers: int,
    grad_checkpointing: bool,
    vision_choice: bool,
    offload_choice: bool,
    forwards: Sequence[int | None],
) -> list[Settings]:
    """Every setting to plan: the recipe's value where it set one, else each option."""

    def options(name: str, free: Sequence) -> Sequence:
        return [fixed[name]] if name in fixed else free

    out = []
    for k, offload, vision, forward in itertools.product(
        options("checkpointed_layers", range(layers + 1) if grad_checkpointing else [0]),
        options("offload", [False, True] if offload_choice else [False]),
        options("checkpoint_vision", [True, False] if vision_choice else [True]),
        options("max_forward_tokens", forwards),
    ):
        # Offload with un-checkpointed layers would park their whole activations on the
        # host (module docstring).
        if offload and k < layers and "offload" not in fixed and "checkpointed_layers" not in fixed:
            continue
        out.append(Settings(k, offload, vision, forward))
    return out


def choose(
    counts: Counts,
    dims: Dims,
    setup: Setup,
    batch_for: Callable[[int | None], MicroBatch],
    forwards: Sequence[int | None],
    budget_bytes: float,
    how: str,
    rates: RecomputeFlops,
    tokens_per_sample: float,
    fixed: dict[str, object] | None = None,
) -> BudgetChoice:
    """The cheapest setting (``extra_seconds``, then fewer forward passes) whose planned process peak is at
    most ``budget_bytes``; when none is, the one of the smallest peak. ``batch_for(max_forward_tokens)``: the
    micro-batch planned; ``forwards``: the forward sizes to try; ``fixed``: the settings the recipe set."""
    fixed = fixed or {}
    vision_grad = setup.vision_trains or bool(setup.vision_lora_inputs)
    # the Qwen-VL resampler follows perf.checkpoint_vision; a family's mergers never do (Dims.mergers)
    resampler = not dims.mergers
    vision_choice = setup.grad_checkpointing and (vision_grad or (resampler and setup.resampler_trains))
    vision_part = " and ".join(
        [*(["vision tower"] if vision_grad else []), *(["resampler"] if resampler else [])]
    )
    planned = []
    # The host copies are verified in one process and under DDP, not with DeepSpeed's hooks (train.offload).
    offload_choice = setup.grad_checkpointing and not setup.deepspeed
    for settings in candidates(
        fixed, dims.layers, setup.grad_checkpointing, vision_choice, offload_choice, forwards
    ):
        batch = batch_for(settings.max_forward_tokens)
        trial = dataclasses.replace(
            setup,
            checkpointed_layers=settings.checkpointed_layers,
            offload_activations=settings.offload,
            vision_checkpointing=settings.checkpoint_vision,
        )
        est = estimate(counts, dims, trial, batch)
        cost = extra_seconds(settings, trial, dims, counts, rates, batch, tokens_per_sample)
        planned.append((settings, batch, est, cost))
    fitting = [p for p in planned if p[2].process_peak <= budget_bytes]
    if fitting:
        settings, batch, est, cost = min(fitting, key=lambda p: (p[3], p[1].passes))
    else:  # the smallest peak; between equal peaks (set by the weights), the least memory in every phase
        settings, batch, est, cost = min(
            planned, key=lambda p: (p[2].process_peak, p[2].peak, sum(p[2].phases.values()))
        )
    return BudgetChoice(
        budget_gib=budget_bytes / GiB,
        how=how,
        settings=settings,
        layers=dims.layers,
        pass_tokens=batch.pass_tokens,
        planned_peak_gib=est.process_peak / GiB,
        fits=bool(fitting),
        fixed=tuple(name for name in FIELDS if name in fixed),
        vision_grad=vision_grad,
        vision_part=vision_part,
        extra_seconds=cost,
        checkpointing=setup.grad_checkpointing,
    )


def fixed_settings(recipe: Recipe, layers: int) -> dict[str, object]:
    """The settings ``recipe`` gives a value (not ``auto``), by the names of ``Settings``."""
    p, t = recipe.perf, recipe.train
    values = {
        "checkpointed_layers": layers if p.checkpoint_llm_layers is None else p.checkpoint_llm_layers,
        "offload": p.offload_activations,
        "checkpoint_vision": p.checkpoint_vision,
        "max_forward_tokens": t.max_forward_tokens,
    }
    raw = {
        "checkpointed_layers": p.checkpoint_llm_layers,
        "offload": p.offload_activations,
        "checkpoint_vision": p.checkpoint_vision,
        "max_forward_tokens": t.max_forward_tokens,
    }
    return {name: values[name] for name in FIELDS if raw[name] != AUTO}


def without_budget(recipe: Recipe) -> Recipe:
    """``auto`` settings as they are without a budget: every layer checkpointed with its input on the GPU,
    the resampler checkpointed, forwards of one packed row (data.pack_len; without it, one per
    micro-batch)."""
    p, t, d = recipe.perf, recipe.train, recipe.data
    # data.pack_len, not data.row_len: a recipe packing rows of max_len (no pack_len) keeps one forward per
    # micro-batch, as it ran before the budget (tests/test_train_budget.py pins both)
    one_row = d.pack_len if d.packing else None
    return apply(
        recipe,
        Settings(
            checkpointed_layers=None if p.checkpoint_llm_layers == AUTO else p.checkpoint_llm_layers,
            offload=False if p.offload_activations == AUTO else p.offload_activations,
            checkpoint_vision=True if p.checkpoint_vision == AUTO else p.checkpoint_vision,
            max_forward_tokens=one_row if t.max_forward_tokens == AUTO else t.max_forward_tokens,
        ),
    )


def apply(recipe: Recipe, settings: Settings) -> Recipe:
    """``recipe`` with ``settings`` in its fields (resolved.yaml records what ran)."""
    perf = dataclasses.replace(
        recipe.perf,
        checkpoint_llm_layers=settings.checkpointed_layers,
        offload_activations=settings.offload,
        checkpoint_vision=settings.checkpoint_vision,
    )
    train = dataclasses.replace(recipe.train, max_forward_tokens=settings.max_forward_tokens)
    return dataclasses.replace(recipe, perf=perf, train=train)
