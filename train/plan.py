"""``python -m train.plan RECIPE.yaml [key=value ...] [--gpus N --gpu-mem GiB] [--mfu 0.35]``: memory and
speed of a recipe per GPU, before anything is loaded.

The model is built on the meta device (no memory, no weights read) from the recipe's preset, LLM
config or ``init_from`` config.json, then frozen and LoRA-wrapped by the trainer's own functions
(train.freeze, train.lora), so the parameter counts are the trainer's. Its shapes come from its model
family (train.assemble's ``ModelFamily.plan_shape``): the Qwen-VL model's fixed image size, or a Hugging
Face family's (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) largest image that data.max_pixels admits. train/memory.py
turns the counts and the micro-batch's tokens and images into bytes per GPU; train/flops.py gives the
FLOPs of a step (the convention of the training logs' MFU), and an assumed MFU gives the step time.

What the planner assumes is printed with the plan (and is in ``--json``): tokens per sample (default
``data.max_len``, the worst case), images per sample (default 1), the loss kernel ``auto`` resolves to on a
GPU (liger), and an allowance for what ``max_memory_allocated`` does not see (CUDA context, NCCL, the
caching allocator's slack). docs/benchmarks.md compares the plan with every GPU measurement we have.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from models.errors import ArgumentParser, UserError, run_cli
from train.assemble import assemble, family_of
from train.budget import BudgetChoice, choose, fixed_settings, without_budget
from train.budget import apply as apply_settings
from train.dpo import reference_mode, runs_adapter_off_reference
from train.flops import forward_flops, recompute_flops, step_flops
from train.freeze import group_of
from train.memory import Counts, Estimate, GiB, MicroBatch, ModelShape, Setup, estimate
from train.optim import param_groups
from train.parallel import deepspeed_config, resolve_mode
from train.perf import compile_llm_blockers
from train.recipe import Recipe, RecipeError, load_recipe

DEFAULT_GPU_MEM_GIB = 80.0  # H100 80GB
DEFAULT_PEAK_TFLOPS = 989.0  # dense bf16, H100 / H200 SXM (train/logger.py)
CONTEXT_GIB = 1.0  # CUDA context + kernels' workspaces outside torch's allocator
NCCL_GIB = 0.5  # communicator buffers, with more than one GPU or under DeepSpeed
ALLOCATOR_SLACK = 0.10  # reserved but unallocated blocks of the caching allocator, as a share of the peak
MAX_SHARD_BYTES = 5e9  # models.vlm.MAX_SHARD_SIZE ("5GB")
MAX_MICRO_BATCH = 1 << 16


# ------------------------------------------------------------------------------------------ the model
@dataclass
class ModelPlan:
    """The model as the trainer would build it: config, counts, what trains."""

    config: Any  # models.config.VLMConfig (vocabulary and image size resolved), or a family's HF config
    shape: ModelShape  # dimensions and FLOPs by part (the family's plan_shape)
    counts: Counts
    groups: dict[str, tuple[int, int]]  # group -> (trainable, total)
    trains: dict[str, bool]  # vision, resampler, llm, embeddings (train.freeze.apply_freezing)
    lora_inputs: tuple[int, ...]  # in_features of the LoRA-adapted linears of one decoder layer
    vision_lora_inputs: tuple[int, ...]  # the same for one vision block (lora.vision_targets)
    vision_lora: int  # adapter parameters in the vision tower (train/flops.py counts them per patch)
    notes: list[str] = field(default_factory=list)


def plan_model(recipe: Recipe, source: str = "recipe") -> ModelPlan:
    """The recipe's model as the trainer assembles it (train.assemble), on the meta device, counted."""
    assembled = assemble(recipe, "meta", source=source)
    model, wrapped = assembled.vlm, assembled.model
    shape = family_of(recipe.model).plan_shape(model, recipe.data)
    decoder = model.llm.get_decoder()
    # The decoder's own linears (peft's adapters are linears too, named lora_*): train.lora.quantize_llm_4bit
    # turns exactly these weights into NF4.
    quantized_ids = (
        {
            id(mod.weight)
            for name, mod in decoder.named_modules()
            if type(mod) is nn.Linear and "lora_" not in name
        }
        if recipe.quantization.enabled
        else set()
    )
    layer_linears = sum(
        mod.weight.numel()
        for name, mod in decoder.layers[0].named_modules()
        if type(mod) is nn.Linear and "lora_" not in name
    )
    lora_inputs = tuple(mod.in_features for mod in decoder.layers[0].modules() if hasattr(mod, "lora_A"))
    vision_lora_inputs = tuple(
        mod.in_features
        for mod in model.get_submodule(f"{shape.vision_blocks}.0").modules()
        if hasattr(mod, "lora_A")
    )

    total = trainable = quantized = lora = vision_lora = 0
    groups: dict[str, list[int]] = {}
    for name, p in wrapped.named_parameters():
        n = p.numel()
        total += n
        row = groups.setdefault(group_of(name), [0, 0])
        row[1] += n
        if p.requires_grad:
            trainable += n
            row[0] += n
        quantized += n if id(p) in quantized_ids else 0
        lora += n if "lora_" in name else 0
        vision_lora += n if "lora_" in name and f".{shape.vision_blocks}." in f".{name}" else 0
    if trainable == 0:
        raise UserError(f"{source}: nothing trains: check the freeze and lora sections")
    largest = max(
        sum(p.numel() for p in g["params"])
        for g in param_groups(wrapped, recipe.optim, shape.dims.vit_layers)
    )
    counts = Counts(
        total=total,
        trainable=trainable,
        quantized=quantized,
        lora=lora,
        largest_group=largest,
        layer_linears=layer_linears,
    )
    return ModelPlan(
        config=model.config,
        shape=shape,
        counts=counts,
        groups={k: (v[0], v[1]) for k, v in groups.items()},
        trains=assembled.trains,
        lora_inputs=lora_inputs,
        vision_lora_inputs=vision_lora_inputs,
        vision_lora=vision_lora,
        notes=assembled.notes,
    )


# ------------------------------------------------------------------------------------------ the run
def setup_of(recipe: Recipe, model: ModelPlan, gpus: int, notes: list[str], source: str) -> Setup:
    """The recipe's training settings as train/memory.py needs them, for ``gpus`` GPUs."""
    mode = resolve_mode(recipe.parallel, gpus)
    zero: dict = {}
    if mode in ("zero2", "zero3"):
        try:
            config = deepspeed_config(recipe.parallel, recipe.train, recipe.optim.clip_grad, mode, gpus)
            zero = config["zero_optimization"]
        except ValueError as e:
            raise UserError(f"{source}: {e}") from e
        if zero.get("offload_optimizer") or zero.get("offload_param"):
            notes.append("DeepSpeed offload is set: the plan still counts the offloaded states on the GPU")
    layers = model.shape.dims.layers
    checkpointed = recipe.perf.checkpoint_llm_layers
    if checkpointed is not None and not 0 <= checkpointed <= layers:
        raise UserError(
            f"{source}: perf.checkpoint_llm_layers={checkpointed} but the decoder has {layers} layers"
        )
    # "auto" as train.perf.resolve_perf decides it on the GPU machine, assumed to have the gpu extra (liger).
    perf = recipe.perf
    loss_impl = "liger" if perf.loss_impl == "auto" else perf.loss_impl
    # Where the decoder layers compile, resolve_perf leaves liger's kernels off: inductor fuses the same
    # RMSNorm / RoPE / SwiGLU work, and its layers keep what liger's would (bf16 norm inputs, no SiLU
    # output: the calibration's rows, docs/experiments/2026-12-07-compiled-activations.md). So the memory
    # model is liger's either way, also for a family that liger's kernels do not cover.
    compiles = perf.compile_llm is True or (
        perf.compile_llm == "auto"
        and not compile_llm_blockers(
            cuda=True,
            quantized=recipe.quantization.enabled,
            zero3=mode == "zero3",
            adapter_off_reference=runs_adapter_off_reference(recipe),
        )
    )
    liger_kernels = (
        model.shape.liger_kernels if perf.liger_kernels == "auto" else perf.liger_kernels
    ) or compiles
    if "auto" in (perf.loss_impl, perf.liger_kernels):
        notes.append(
            "perf auto switches as on a CUDA machine with liger-kernel installed: fused liger loss"
            + (", liger kernels (or compiled layers fusing the same work)" if liger_kernels else "")
        )
    reference = ""
    if recipe.train.stage == "dpo":
        reference = reference_mode(recipe.preference, recipe.lora)
        if loss_impl != "torch":  # models.loss.causal_lm_token_logps: liger's per-token mode is not used
            loss_impl = "chunked"
        notes.append(
            f"DPO: micro_batch counts pairs (2 sequences showing the pair's images, encoded once; "
            f"--tokens-per-sample is per sequence), per-token log-probs chunked, reference {reference}"
        )
    m = recipe.model
    drawn_on_gpu = (
        m.init_from is None and m.llm_path is None and m.openclip_name is None
    )  # train.assemble.build_model
    loaded_on_gpu = m.init_from is not None and mode != "zero3" and not recipe.quantization.enabled
    return Setup(
        # train.assemble.storage_dtypes: frozen weights bf16 only with bf16 training
        mode=mode,
        gpus=gpus,
        bf16=recipe.train.bf16,
        frozen_bf16=recipe.perf.frozen_bf16 and recipe.train.bf16,
        vision_trains=model.trains["vision"],
        resampler_trains=model.trains["resampler"],
        llm_trains=model.trains["llm"],
        head_trains=model.trains["embeddings"],
        lora_inputs=model.lora_inputs,
        vision_lora_inputs=model.vision_lora_inputs,
        lora_r=recipe.lora.r if recipe.lora.enabled else 0,
        lora_dropout=recipe.lora.dropout,
        quantized=recipe.quantization.enabled,
        double_quant=recipe.quantization.double_quant,
        grad_checkpointing=recipe.train.grad_checkpointing,
        checkpointed_layers=layers if checkpointed is None else checkpointed,
        liger_kernels=bool(liger_kernels),
        loss_impl=loss_impl,
        attention=perf.attention,
        grad_accum=recipe.train.grad_accum,
        zero=zero,
        # train.optim fuses AdamW when the weights are on the GPU as it is built (Q-LoRA moves them there).
        fused_adamw=drawn_on_gpu or loaded_on_gpu or recipe.quantization.enabled,
        load_shard_bytes=largest_shard(m.init_from, notes) if loaded_on_gpu else 0.0,
        zero3_built_whole=mode == "zero3" and drawn_on_gpu,
        reference=reference,
        offload_activations=perf.offload_activations,
        vision_checkpointing=perf.checkpoint_vision,
    )


def largest_shard(export: str, notes: list[str]) -> float:
    """Bytes of the largest safetensors file of an export (models.load_vlm holds one at a time on the
    GPU beside the model); models.vlm.MAX_SHARD_SIZE when the export does not exist yet."""
    files = list(Path(export).glob("*.safetensors"))
    if files:
        return float(max(f.stat().st_size for f in files))
    notes.append(
        f"export shards of {MAX_SHARD_BYTES / 1e9:g} GB (models.vlm.MAX_SHARD_SIZE) read onto the GPU"
    )
    return MAX_SHARD_BYTES


def samples_per_row(data, tokens_per_sample: float, group: int = 1) -> int:
    """Sequences of equal length in one row: as many groups of ``group`` (a DPO pair: 2) as fit in pack_len
    (else max_len) when packing, else one sequence per row."""
    if not data.packing:
        return 1
    return group * max(1, int(data.row_len // (group * tokens_per_sample)))


def samples_per_micro_batch(train, tokens_per_sample: float, group: int = 1) -> int:
    """Samples (DPO: pairs of ``group`` sequences) of ``tokens_per_sample`` tokens each in a micro-batch:
    ``train.micro_batch``, or fewer where ``train.micro_batch_tokens`` closes it first (at least one,
    data.sampler.token_batches)."""
    if train.micro_batch_tokens is None:
        return train.micro_batch
    fitting = int(train.micro_batch_tokens // (group * tokens_per_sample))
    return max(1, min(train.micro_batch, fitting))


def micro_batch_shape(
    data,
    micro_batch: int,
    tokens_per_sample: float,
    images_per_sample: float,
    max_forward_tokens: int | None = None,
    group: int = 1,
) -> MicroBatch:
    """Rows and tokens of a micro-batch of ``micro_batch`` samples (DPO: pairs of ``group`` = 2 sequences,
    whose images the batch holds once per pair, data.collate) of ``tokens_per_sample`` tokens per sequence.
    Packed (data.packing): greedy rows of up to pack_len (else max_len) tokens, padded to the longest row
    (data.packing.pack); otherwise one sequence per row. ``max_forward_tokens`` (train.max_forward_tokens):
    forward passes of as many whole rows as fit (at least one; data.collate.split_rows)."""
    sequences = micro_batch * group
    per_row = samples_per_row(data, tokens_per_sample, group)
    rows = math.ceil(sequences / per_row)
    width = round(min(sequences, per_row) * tokens_per_sample)
    rows_per_pass = max(1, max_forward_tokens // width) if max_forward_tokens else None
    return MicroBatch(
        samples=sequences,
        rows=rows,
        row_len=width,
        images=micro_batch * images_per_sample,
        real_tokens=sequences * tokens_per_sample,
        packed=data.packing,
        rows_per_pass=rows_per_pass,
    )


@dataclass
class Plan:
    recipe: str
    model: ModelPlan
    setup: Setup
    batch: MicroBatch
    estimate: Estimate
    tokens_per_sample: float
    images_per_sample: float
    gpu_mem_gib: float
    flops_per_step: float  # per GPU, one optimiser step (train/flops.py)
    mfu: float
    peak_tflops: float
    largest_micro_batch: int | None = 0  # 0: not even one sample fits; None: not bounded (max_forward_tokens)
    largest_forward_tokens: int | None = None  # with train.max_forward_tokens: the longest pass that fits
    budget: BudgetChoice | None = None  # train.memory_budget's choice (train/budget.py)
    notes: list[str] = field(default_factory=list)

    @property
    def allowance(self) -> float:
        return allowance_bytes(self.estimate, self.setup)

    @property
    def needed(self) -> float:
        return needed_bytes(self.estimate, self.setup)

    @property
    def fits(self) -> bool:
        return self.needed <= self.gpu_mem_gib * GiB

    @property
    def step_time(self) -> float:
        return self.flops_per_step / (self.mfu * self.peak_tflops * 1e12)

    @property
    def tokens_per_step(self) -> float:
        """Sample tokens (row padding excluded) per GPU per optimiser step."""
        return self.batch.real_tokens * self.setup.grad_accum


def allowance_bytes(est: Estimate, setup: Setup) -> float:
    """Bytes the GPU needs beyond torch's max_memory_allocated: the CUDA context (and NCCL's buffers with
    several GPUs or DeepSpeed), plus the caching allocator's slack as a share of the peak."""
    extra = NCCL_GIB if setup.gpus > 1 or setup.deepspeed else 0.0
    return ALLOCATOR_SLACK * est.process_peak + (CONTEXT_GIB + extra) * GiB


def needed_bytes(est: Estimate, setup: Setup) -> float:
    return est.process_peak + allowance_bytes(est, setup)


def budget_for_device(gpu_mem_gib: float, setup: Setup) -> float:
    """The largest process peak (bytes) whose ``needed_bytes`` fits ``gpu_mem_gib``:
    the inverse of the allowance."""
    extra = NCCL_GIB if setup.gpus > 1 or setup.deepspeed else 0.0
    return (gpu_mem_gib - CONTEXT_GIB - extra) * GiB / (1 + ALLOCATOR_SLACK)


def settle_budget(
    recipe: Recipe, model: ModelPlan, gpus: int, gpu_mem_gib: float, source: str
) -> tuple[Recipe, BudgetChoice | None]:
    """``recipe`` with its ``auto`` activation settings filled in: chosen for train.memory_budget
    (train/budget.py; ``auto``: ``gpu_mem_gib`` less the allowance), or as without a budget when it is None.
    The choice is planned for the worst a forward can hold: samples of data.max_len tokens, every token of
    them an image slot."""
    if recipe.train.memory_budget is None:
        return without_budget(recipe), None
    setup = setup_of(without_budget(recipe), model, gpus, [], source)
    data, tokens = recipe.data, recipe.data.max_len
    images = tokens / (model.shape.dims.queries + 2)  # the image's start + slots + end

    def batch_for(max_forward_tokens: int | None) -> MicroBatch:
        group = 2 if setup.reference else 1
        samples = samples_per_micro_batch(recipe.train, tokens, group)
        return micro_batch_shape(data, samples, tokens, images, max_forward_tokens, group)

    whole = batch_for(None)
    forwards = sorted({whole.row_len * min(2**i, whole.rows) for i in range(whole.rows.bit_length() + 1)})
    if recipe.train.memory_budget == "auto":
        budget = budget_for_device(gpu_mem_gib, setup)
        how = (
            f"auto: {gpu_mem_gib:.1f} GiB less the CUDA context"
            f"{', NCCL' if setup.deepspeed or gpus > 1 else ''} "
            f"and allocator slack"
        )
    else:
        budget, how = recipe.train.memory_budget * GiB, "train.memory_budget"
    layers = model.shape.dims.layers
    choice = choose(
        model.counts,
        model.shape.dims,
        setup,
        batch_for,
        forwards,
        budget,
        how,
        recompute_flops(model.shape.flops),
        tokens,
        fixed_settings(recipe, layers),
    )
    return apply_settings(recipe, choice.settings), choice


def make_plan(
    recipe: Recipe,
    source: str,
    gpus: int = 1,
    gpu_mem_gib: float = DEFAULT_GPU_MEM_GIB,
    tokens_per_sample: float | None = None,
    images_per_sample: float = 1.0,
    mfu: float = 0.35,
    peak_tflops: float = DEFAULT_PEAK_TFLOPS,
    model: ModelPlan | None = None,
) -> Plan:
    """The plan of ``recipe`` on ``gpus`` GPUs. ``model`` reuses a ModelPlan of the same recipe model."""
    for name, value, low in (
        ("--gpus", gpus, 1),
        ("--gpu-mem", gpu_mem_gib, 1e-9),
        ("--peak-tflops", peak_tflops, 1e-9),
    ):
        if value < low:
            raise UserError(f"{name} must be positive, got {value}")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu is a fraction in (0, 1], got {mfu}")
    if images_per_sample < 0:
        raise UserError(f"--images-per-sample must be >= 0, got {images_per_sample}")
    data = recipe.data
    tokens = data.max_len if tokens_per_sample is None else tokens_per_sample
    if not 0 < tokens <= data.max_len:
        raise UserError(f"--tokens-per-sample must be in (0, data.max_len={data.max_len}], got {tokens}")
    model = model or plan_model(recipe, source)
    notes = list(model.notes)
    recipe, choice = settle_budget(recipe, model, gpus, gpu_mem_gib, source)
    if tokens_per_sample is None:
        notes.append(
            f"every sample {data.max_len} tokens (data.max_len, the worst case; --tokens-per-sample)"
        )
    setup = setup_of(recipe, model, gpus, notes, source)
    dims = model.shape.dims
    group = 2 if setup.reference else 1  # DPO: a pair is two sequences
    image_tokens = images_per_sample * (dims.queries + 2)  # the image's start + slots + end
    if image_tokens > tokens:  # a family's image planned at data.max_pixels, larger than such samples hold
        notes.append(
            f"{images_per_sample:g} image(s) a sample, each {model.shape.image}, take {image_tokens:,.0f} "
            f"tokens, more than a sample's {tokens:g}: the vision part is planned for images these samples "
            "cannot hold; set data.max_pixels to your images' size"
        )

    def estimate_for(micro_batch: int) -> tuple[MicroBatch, Estimate]:
        batch = micro_batch_shape(
            data, micro_batch, tokens, images_per_sample, recipe.train.max_forward_tokens, group
        )
        return batch, estimate(model.counts, dims, setup, batch)

    batch, est = estimate_for(samples_per_micro_batch(recipe.train, tokens, group))
    # The training loop's FLOP count: train.loop (adapters in the ViT per patch; DPO's reference forward).
    llm_lora = model.counts.lora - model.vision_lora
    rates = step_flops(
        model.shape.flops,
        vision_trains=setup.vision_trains,
        resampler_trains=setup.resampler_trains,
        llm_trains=setup.llm_trains,
        lora_params=llm_lora,
        vision_lora_params=model.vision_lora,
    )
    if setup.reference in ("frozen_copy", "adapter_disabled"):  # a frozen ViT's encoding is the policy's
        policy_vision_frozen = not setup.vision_trains and not model.vision_lora
        rates = rates + forward_flops(model.shape.flops, vision=not policy_vision_frozen)
    samples = batch.samples * setup.grad_accum
    flops = rates(samples * tokens, batch.images * setup.grad_accum, samples * tokens**2)
    plan = Plan(
        recipe=source,
        model=model,
        setup=setup,
        batch=batch,
        estimate=est,
        tokens_per_sample=tokens,
        images_per_sample=images_per_sample,
        gpu_mem_gib=gpu_mem_gib,
        flops_per_step=flops,
        mfu=mfu,
        peak_tflops=peak_tflops,
        budget=choice,
        notes=notes,
    )
    budget = gpu_mem_gib * GiB
    if recipe.train.max_forward_tokens is None:
        plan.largest_micro_batch = largest_fitting(
            lambda mb: needed_bytes(estimate_for(mb)[1], setup), budget
        )
        return plan
    # Memory follows the forward pass, not the micro-batch: suggest the longest pass of whole rows that fits
    # (in a micro-batch of more rows than that, so gradients persist across passes as they would).
    per_row = samples_per_row(data, tokens, group)
    row = round(per_row * tokens)

    def needed_for_rows(rows: int) -> float:
        shape = micro_batch_shape(
            data, (rows + 1) * per_row // group, tokens, images_per_sample, rows * row, group
        )
        return needed_bytes(estimate(model.counts, dims, setup, shape), setup)

    plan.largest_micro_batch = None
    plan.largest_forward_tokens = largest_fitting(needed_for_rows, budget) * row
    return plan


def largest_fitting(needed, budget: float) -> int:
    """The largest m (1 <= m <= MAX_MICRO_BATCH) with needed(m) <= budget, 0 if none (needed grows with m:
    exponential search, then bisection)."""
    if needed(1) > budget:
        return 0
    low, high = 1, 2
    while high <= MAX_MICRO_BATCH and needed(high) <= budget:
        low, high = high, high * 2
    high = min(high, MAX_MICRO_BATCH + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if needed(mid) <= budget else (low, mid)
    return low


# ------------------------------------------------------------------------------------------ output
def _gib(x: float) -> str:
    v = x / GiB
    return f"{v:.1f}" if v >= 0.1 or v == 0 else f"{v:.2g}"


def _b(n: float) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def describe_mode(s: Setup) -> str:
    if s.deepspeed:
        return (
            f"DeepSpeed {s.mode.upper().replace('ZERO', 'ZeRO-')} over {s.gpus} GPU(s): "
            f"{'bf16 weights, fp32 master weights' if s.bf16 else 'fp32 weights'}, AdamW states fp32"
        )
    where = "DDP" if s.mode == "ddp" else "one process"
    frozen = "bf16 (perf.frozen_bf16)" if s.frozen_bf16 else "fp32"
    return (
        f"{where} on {s.gpus} GPU(s): trainable fp32 + AdamW fp32{' under bf16 autocast' if s.bf16 else ''}, "
        f"frozen {frozen}"
    )


def render(plan: Plan) -> str:
    s, b, est, c = plan.setup, plan.batch, plan.estimate, plan.model.counts
    lines = [f"plan of {plan.recipe} (per GPU)", ""]
    lines.append(f"{'parameters':<34}{c.total:>16,}  ({_b(c.total)})")
    lines.append(f"{'trainable':<34}{c.trainable:>16,}  ({100 * c.trainable / c.total:.2f}%)")
    for group, (t, n) in plan.model.groups.items():
        lines.append(f"  {group:<32}{t:>16,} of {n:,}")
    if c.quantized:
        lines.append(f"{'4-bit (NF4) decoder weights':<34}{c.quantized:>16,}")
    lines.append(f"{'mode':<34}{describe_mode(s)}")
    packing = f"{'packed in ' if b.packed else ''}{b.rows} row(s) of {b.row_len}"
    if b.passes > 1:
        packing += f"; {b.passes} forward passes of {b.pass_tokens:,} tokens (train.max_forward_tokens)"
    what = f"{b.samples // 2} pairs = {b.samples} sequences" if s.reference else f"{b.samples} samples"
    lines.append(
        f"{'micro-batch':<34}{what} x {plan.tokens_per_sample:g} tokens = "
        f"{b.tokens:,} tokens ({packing}), {b.images:g} images at {plan.model.shape.image}"
    )
    ckpt = (
        f"{s.checkpointed_layers} of {plan.model.shape.dims.layers} decoder layers checkpointed"
        if s.grad_checkpointing
        else "no activation checkpointing"
    )
    lines.append(
        f"{'activations':<34}{ckpt}; loss {s.loss_impl}; attention {s.attention}"
        f"{'; liger kernels' if s.liger_kernels else ''}"
    )
    if plan.budget is not None:
        lines.append(f"{'':<34}{plan.budget.line}")
    lines += ["", f"{'memory':<34}{'GiB':>8}"]
    for key, value in est.terms.items():
        if value:
            lines.append(f"  {key:<32}{_gib(value):>8}")
    lines.append("  allocated during the step:")
    for phase, value in est.phases.items():
        lines.append(f"    {phase:<30}{_gib(value):>8}" + ("  <- peak" if phase == est.peak_phase else ""))
    lines.append(
        f"{'peak of a step':<34}{_gib(est.peak):>8}  (at {est.peak_phase}; torch.cuda.max_memory_allocated)"
    )
    if est.startup > est.peak:
        why = (
            "the whole bf16 model on each GPU before ZeRO-3 partitions it"
            if s.zero3_built_whole
            else "the weights and the largest export shard being read"
        )
        lines.append(f"{'peak while building the model':<34}{_gib(est.startup):>8}  ({why})")
    lines.append(
        f"{'+ allowance':<34}{_gib(plan.allowance):>8}  (CUDA context and NCCL, "
        f"{ALLOCATOR_SLACK:.0%} allocator slack)"
    )
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"{'needed / --gpu-mem':<34}{_gib(plan.needed):>8} / {plan.gpu_mem_gib:g}  {verdict}")
    if plan.largest_forward_tokens is not None:
        lines.append(
            f"{'largest forward pass that fits':<34}{plan.largest_forward_tokens:>8}  tokens (whole rows, "
            f"train.max_forward_tokens; the micro-batch itself does not bound memory)"
        )
    else:
        lines.append(f"{'largest micro-batch that fits':<34}{plan.largest_micro_batch:>8}")
    if not (plan.largest_micro_batch or plan.largest_forward_tokens):
        lines.append(
            f"{'':<34}not even one row fits: shorter rows, more checkpointed layers, more GPUs or ZeRO-3"
        )
    lines += [
        "",
        f"{'FLOPs per step (train/flops.py)':<34}{plan.flops_per_step:.3e} per GPU  "
        f"({s.grad_accum} micro-batch(es) of {what})",
    ]
    lines.append(
        f"{'step time':<34}{plan.step_time:.3g} s at {plan.mfu:.0%} MFU of {plan.peak_tflops:g} TFLOP/s"
    )
    per_gpu = plan.tokens_per_step / plan.step_time
    lines.append(f"{'tokens/s':<34}{per_gpu:,.0f} per GPU, {per_gpu * s.gpus:,.0f} over {s.gpus} GPU(s)")
    if plan.notes:
        lines += ["", "assumed:"] + [f"  - {note}" for note in plan.notes]
    return "\n".join(lines)


def to_json(plan: Plan) -> dict[str, Any]:
    est, b = plan.estimate, plan.batch
    return {
        "recipe": plan.recipe,
        "parameters": dataclasses.asdict(plan.model.counts),
        "groups": {k: {"trainable": t, "total": n} for k, (t, n) in plan.model.groups.items()},
        "setup": {k: v for k, v in dataclasses.asdict(plan.setup).items()},
        "micro_batch": {**dataclasses.asdict(b), "tokens": b.tokens},
        "tokens_per_sample": plan.tokens_per_sample,
        "images_per_sample": plan.images_per_sample,
        "memory_gib": {k: v / GiB for k, v in est.terms.items()},
        "phases_gib": {k: v / GiB for k, v in est.phases.items()},
        "peak_gib": est.peak / GiB,
        "peak_phase": est.peak_phase,
        "startup_gib": est.startup / GiB,
        "process_peak_gib": est.process_peak / GiB,
        "allowance_gib": plan.allowance / GiB,
        "needed_gib": plan.needed / GiB,
        "gpu_mem_gib": plan.gpu_mem_gib,
        "fits": plan.fits,
        "largest_micro_batch": plan.largest_micro_batch,
        "largest_forward_tokens": plan.largest_forward_tokens,
        "flops_per_step": plan.flops_per_step,
        "mfu": plan.mfu,
        "peak_tflops": plan.peak_tflops,
        "step_time_s": plan.step_time,
        "tokens_per_s_per_gpu": plan.tokens_per_step / plan.step_time,
        "memory_budget": None
        if plan.budget is None
        else {**dataclasses.asdict(plan.budget), "line": plan.budget.line},
        "notes": plan.notes,
    }


def main(argv: list[str] | None = None, prog: str = "python -m train.plan") -> None:
    p = ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        examples=[
            "recipes/sft_lora.yaml model.init_from=ckpt/qwen-vl-chat --gpus 8 --tokens-per-sample 600",
            "recipes/sft.yaml --gpus 8 --gpu-mem 80 --json",
        ],
    )
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, as for python -m train")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (parallel.mode auto: DDP when more than one)")
    p.add_argument(
        "--gpu-mem", type=float, default=DEFAULT_GPU_MEM_GIB, help="GiB per GPU (default 80, an H100)"
    )
    p.add_argument("--mfu", type=float, default=0.35, help="assumed model-FLOP utilisation for the step time")
    p.add_argument(
        "--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS, help="dense bf16 peak of one GPU"
    )
    p.add_argument(
        "--tokens-per-sample",
        type=float,
        default=None,
        help="average tokens per sample (default data.max_len: every sample at the limit)",
    )
    p.add_argument("--images-per-sample", type=float, default=1.0, help="average images per sample")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    a = p.parse_intermixed_args(argv)
    recipe = load_recipe(a.recipe, a.overrides)
    plan = make_plan(
        recipe,
        a.recipe,
        gpus=a.gpus,
        gpu_mem_gib=a.gpu_mem,
        tokens_per_sample=a.tokens_per_sample,
        images_per_sample=a.images_per_sample,
        mfu=a.mfu,
        peak_tflops=a.peak_tflops,
    )
    print(json.dumps(to_json(plan), indent=2) if a.json else render(plan), file=sys.stdout)


if __name__ == "__main__":
    run_cli(main, user_errors=(RecipeError,))
