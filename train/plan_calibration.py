"""The planner against every GPU memory measurement we have: ``python -m train.plan_calibration``
prints the table of docs/benchmarks.md (measured, planned, error); tests/test_train_plan.py holds each
run within 15%.

Each run is written as the recipe and overrides it ran with; for runs before commit 7365904 the switches
whose defaults have moved since (perf autos, frozen_bf16, max_forward_tokens) are pinned to what the run
had. Three kinds of figure:
- "trainer": the training loop's ``peak_mem_gib``, ``torch.cuda.max_memory_allocated()`` since the process
  started, so it includes building the model (compared with the plan's process peak); since 7365904
  ``python -m train.bench`` reports the same figure;
- "bench": the former standalone train.bench's peak over its timed steps, after ``reset_peak_memory_stats``
  (compared with the plan's step peak). It built in bf16 and applied the switches itself; its LoRA cases
  are the trainer's single-GPU LoRA with frozen weights in bf16 and the resampler frozen;
- "build": the peak before the first step (the trainer prints it), compared with the plan's start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from train.bench import PLAIN
from train.memory import GiB
from train.plan import ModelPlan, Plan, make_plan, plan_model
from train.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
# The issue-11 runs' model: the Qwen-VL shape with random weights and the synthetic world's tokenizer
# (no special token added, so embeddings: auto leaves the embeddings frozen) padded to Qwen's vocabulary.
FULL_SHAPE = ("model.init_from=null", "model.preset=qwen_vl_7b", "model.pad_vocab_to=151936")
# Before commit 7365904: no compiled layers unless asked, no liger kernels unless asked, frozen weights fp32,
# one forward per micro-batch.
THEN = ("perf.compile_llm=false", "perf.compile_vision=false", "perf.liger_kernels=false", "perf.frozen_bf16=false",
        "train.max_forward_tokens=null", "perf.offload_activations=false")
# train.bench's LoRA / Q-LoRA "ours" (before 7365904 it ran its own step): the ViT and the resampler frozen,
# every frozen weight bf16, liger loss and kernels, varlen.
BENCH = (*FULL_SHAPE, *THEN, "freeze.resampler=frozen", "perf.frozen_bf16=true", "perf.liger_kernels=true",
         "perf.loss_impl=liger", "perf.attention=varlen", "train.grad_accum=1", "parallel.mode=auto")
# launch/gpu_zero_throughput.sh at commit c8e5ed8 (before data.pack_len: rows of at most 2048 tokens).
ZERO = (*FULL_SHAPE, *THEN, "perf.attention=varlen", "perf.loss_impl=auto", "perf.liger_kernels=true",
        "perf.check_image_spans=false", "train.micro_batch=24", "train.grad_accum=1")
# Issue 11's trainer runs (commit ca58d91): 16 synthetic SFT samples per micro-batch in rows of 8192, with
# sft_lora.yaml's perf section of then. parallel.mode=auto: the figures show an fp32 build, which the
# trainer did only outside DeepSpeed.
ISSUE11 = (*FULL_SHAPE, *THEN, "perf.attention=varlen", "perf.loss_impl=auto", "perf.check_image_spans=true",
           "train.micro_batch=16", "train.grad_accum=1", "data.pack_len=8192", "parallel.mode=auto")
# Commit 7365904 builds frozen weights in bf16 straight on the GPU; before it the trainer drew the whole
# model in fp32 there (LoRA adapters and peft's resampler copy added) and cast frozen weights afterwards.
FP32_BUILD = "superseded by 7365904: the model drawn whole in fp32 before the cast"
# The trainer since 7365904 (docs/benchmarks.md, "Training speed"): the recipe as shipped, its 24 GB / 16 GB
# settings, and the plain anchor (train.bench's PLAIN overrides, 2 samples per forward, accumulating to 16).
FORWARDS_4K = ("data.pack_len=4096", "train.max_forward_tokens=4096")
PLAIN_ANCHOR = (*PLAIN, "train.micro_batch=2", "train.grad_accum=8")
TRAINER = "docs/benchmarks.md (trainer), H100"
TODAY = "docs/benchmarks.md (trainer at 100feda: resampler checkpointed, liger off under compile), H100, 2026-12-06"
# Before sft_lora.yaml turned perf.offload_activations on (commit after e0c170e).
SHIPPED_THEN = (*FULL_SHAPE, "perf.offload_activations=false")
OFFLOAD = ("docs/benchmarks.md (trainer after e0c170e: loss at the label positions, down projection not recomputed), "
           "H100, 2026-12-06")
BENCH_THEN = "docs/benchmarks.md (history), H100"
# Every run here predates train.memory_budget: the recipes set their activation settings by hand, as here.
BEFORE_THE_BUDGET = {
    "recipes/sft_lora.yaml": ("perf.offload_activations=true", "train.max_forward_tokens=8192"),
    "recipes/sft_qlora.yaml": ("perf.offload_activations=false", "train.max_forward_tokens=8192"),
    "recipes/dpo_lora.yaml": ("train.max_forward_tokens=8192",),
}
PAIR_IMAGES_ONCE = "docs/benchmarks.md (trainer with a DPO pair's images encoded once), H100, 2026-12-06"


@dataclass(frozen=True)
class Measurement:
    name: str
    recipe: str
    overrides: tuple[str, ...]
    measured_gib: float
    kind: str  # "trainer" | "bench"
    source: str
    gpus: int = 1
    tokens_per_sample: float = 390.0
    images_per_sample: float = 1.0
    superseded: str = ""  # the trainer has changed since; the figure is checked against what explains it


MEASUREMENTS = [
    Measurement("LoRA: sft_lora, perf as shipped, one process", "recipes/sft_lora.yaml", ISSUE11, 45.6, "trainer",
                "issue 11, H100", tokens_per_sample=390, images_per_sample=1.1),
    Measurement("LoRA: + frozen_bf16 + liger kernels, one process", "recipes/sft_lora.yaml",
                (*ISSUE11, "perf.frozen_bf16=true", "perf.liger_kernels=true", "perf.check_image_spans=false"),
                36.8, "trainer", "issue 11, H100", tokens_per_sample=390, images_per_sample=1.1, superseded=FP32_BUILD),
    Measurement("Q-LoRA: sft_qlora + liger kernels, one process", "recipes/sft_qlora.yaml", (*ISSUE11, "perf.liger_kernels=true"),
                24.9, "trainer", "issue 11, H100", tokens_per_sample=390, images_per_sample=1.1),
    Measurement("LoRA bench, mixed (300-700 tokens), rows of 8192", "recipes/sft_lora.yaml",
                (*BENCH, "data.pack_len=8192", "train.micro_batch=16"), 23.9, "bench", BENCH_THEN,
                tokens_per_sample=500),
    Measurement("LoRA bench, 2048-token samples, rows of 8192", "recipes/sft_lora.yaml",
                (*BENCH, "data.pack_len=8192", "train.micro_batch=4"), 23.5, "bench", BENCH_THEN,
                tokens_per_sample=2048),
    Measurement("Q-LoRA bench, mixed, rows of 4096", "recipes/sft_qlora.yaml",
                (*BENCH, "data.pack_len=4096", "train.micro_batch=8"), 12.7, "bench", BENCH_THEN,
                tokens_per_sample=500),
    Measurement("Q-LoRA bench, 2048-token samples, rows of 8192", "recipes/sft_qlora.yaml",
                (*BENCH, "data.pack_len=8192", "train.micro_batch=4"), 14.7, "bench", BENCH_THEN,
                tokens_per_sample=2048),
    Measurement("LoRA: sft_lora as shipped, world", "recipes/sft_lora.yaml", SHIPPED_THEN, 25.3, "trainer", TRAINER,
                tokens_per_sample=390, images_per_sample=1.1),
    Measurement("LoRA: sft_lora, forwards of 4096, world", "recipes/sft_lora.yaml", (*SHIPPED_THEN, *FORWARDS_4K), 23.9,
                "trainer", TRAINER, tokens_per_sample=390, images_per_sample=1.1),
    Measurement("LoRA: sft_lora as shipped, 2048-token samples", "recipes/sft_lora.yaml", SHIPPED_THEN, 25.6, "trainer",
                TRAINER, tokens_per_sample=2048),
    Measurement("LoRA: sft_lora, forwards of 4096, 2048-token samples", "recipes/sft_lora.yaml",
                (*SHIPPED_THEN, *FORWARDS_4K), 23.6, "trainer", TRAINER, tokens_per_sample=2048),
    Measurement("LoRA: plain anchor (PLAIN, 2 padded samples per forward), world", "recipes/sft_lora.yaml",
                (*FULL_SHAPE, *PLAIN_ANCHOR), 43.8, "trainer", TRAINER, tokens_per_sample=390, images_per_sample=1.1),
    Measurement("Q-LoRA: sft_qlora as shipped, world", "recipes/sft_qlora.yaml", SHIPPED_THEN, 16.5, "trainer", TRAINER,
                tokens_per_sample=390, images_per_sample=1.1),
    Measurement("Q-LoRA: sft_qlora, forwards of 4096, world", "recipes/sft_qlora.yaml", (*FULL_SHAPE, *FORWARDS_4K),
                15.1, "trainer", TRAINER, tokens_per_sample=390, images_per_sample=1.1),
    Measurement("LoRA: sft_lora as shipped, world (resampler checkpointed)", "recipes/sft_lora.yaml", SHIPPED_THEN, 24.3,
                "trainer", TODAY, tokens_per_sample=390, images_per_sample=1.1),
    Measurement("LoRA: sft_lora as shipped, 2048-token samples (resampler checkpointed)", "recipes/sft_lora.yaml",
                SHIPPED_THEN, 25.6, "trainer", TODAY, tokens_per_sample=2048),
    Measurement("Q-LoRA: sft_qlora as shipped, world (resampler checkpointed)", "recipes/sft_qlora.yaml", FULL_SHAPE,
                15.2, "trainer", TODAY, tokens_per_sample=390, images_per_sample=1.1),
    Measurement("DPO-LoRA: dpo_lora as shipped, world pairs", "recipes/dpo_lora.yaml", FULL_SHAPE, 25.4, "trainer",
                PAIR_IMAGES_ONCE, tokens_per_sample=298),
    Measurement("LoRA: sft_lora, offload off, world", "recipes/sft_lora.yaml", SHIPPED_THEN, 24.3, "trainer",
                OFFLOAD, tokens_per_sample=390, images_per_sample=1.1),
    Measurement("LoRA: sft_lora, offload off, 2048-token samples", "recipes/sft_lora.yaml", SHIPPED_THEN, 25.6,
                "trainer", OFFLOAD, tokens_per_sample=2048),
    Measurement("LoRA: sft_lora as shipped (layer inputs offloaded), world", "recipes/sft_lora.yaml", FULL_SHAPE, 23.4,
                "trainer", OFFLOAD, tokens_per_sample=390, images_per_sample=1.1),
    Measurement("LoRA: sft_lora as shipped (layer inputs offloaded), 2048-token samples", "recipes/sft_lora.yaml",
                FULL_SHAPE, 23.7, "trainer", OFFLOAD, tokens_per_sample=2048),
    Measurement("Q-LoRA: sft_qlora as shipped, world (down projection not recomputed)", "recipes/sft_qlora.yaml",
                FULL_SHAPE, 15.4, "trainer", OFFLOAD, tokens_per_sample=390, images_per_sample=1.1),
    Measurement("Q-LoRA: build before the first step", "recipes/sft_qlora.yaml", FULL_SHAPE, 10.1, "build", TRAINER),
    Measurement("full SFT, ZeRO-2, 2 GPUs (rank 0)", "recipes/sft.yaml", (*ZERO, "parallel.mode=zero2"), 90.9,
                "trainer", "docs/benchmarks.md, 2 H200", gpus=2, tokens_per_sample=392, images_per_sample=1.11),
    Measurement("full SFT, ZeRO-3, 2 GPUs (rank 0)", "recipes/sft.yaml", (*ZERO, "parallel.mode=zero3"), 68.6,
                "trainer", "docs/benchmarks.md, 2 H200", gpus=2, tokens_per_sample=392, images_per_sample=1.11),
]


@dataclass(frozen=True)
class Row:
    run: Measurement
    plan: Plan

    @property
    def planned_gib(self) -> float:
        est = self.plan.estimate
        return {"trainer": est.process_peak, "bench": est.peak, "build": est.startup}[self.run.kind] / GiB

    @property
    def error(self) -> float:
        return self.planned_gib / self.run.measured_gib - 1

    @property
    def explained_gib(self) -> float:
        """What a superseded figure measured: the fp32 build of every parameter the run had."""
        return self.plan.model.counts.total * 4 / GiB

    @property
    def where(self) -> str:
        est = self.plan.estimate
        if self.run.superseded:
            return (f"{self.run.superseded}: {self.explained_gib:.1f} GiB "
                    f"({percent(self.explained_gib / self.run.measured_gib - 1)})")
        if self.run.kind == "build":
            return "building the model"
        if self.run.kind == "trainer" and est.startup > est.peak:
            return f"building the model (step peak {est.peak / GiB:.1f})"
        return est.peak_phase


def calibrate(measurements: list[Measurement] = MEASUREMENTS) -> list[Row]:
    """Plan every measured run (a model is built on the meta device once per distinct model section)."""
    models: dict[str, ModelPlan] = {}
    rows = []
    for run in measurements:
        pinned = ["train.memory_budget=null", *BEFORE_THE_BUDGET.get(run.recipe, ())]
        recipe = load_recipe(REPO / run.recipe, [*pinned, *run.overrides])
        key = repr((recipe.model, recipe.freeze, recipe.lora, recipe.quantization, recipe.optim, recipe.data.image_size))
        if key not in models:
            models[key] = plan_model(recipe, run.recipe)
        plan = make_plan(recipe, run.recipe, gpus=run.gpus, tokens_per_sample=run.tokens_per_sample,
                         images_per_sample=run.images_per_sample, model=models[key])
        rows.append(Row(run, plan))
    return rows


def percent(x: float) -> str:
    return f"{round(100 * x, 1) + 0.0:+.1f}%"  # + 0.0: no "-0.0%"


def markdown(rows: list[Row]) -> str:
    lines = ["| run | measured GiB | planned GiB | error | planned peak at | source |", "|---|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r.run.name} | {r.run.measured_gib:.1f} ({r.run.kind}) | {r.planned_gib:.1f} | "
                     f"{percent(r.error)} | {r.where} | {r.run.source} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(calibrate()))
