"""The planner against every GPU memory measurement we have: ``python -m train.plan_calibration``
prints the table of docs/benchmarks.md (measured, planned, error); tests/test_train_plan.py holds each
run within 15%.

Each run is written as the recipe and overrides it ran with. Two kinds of figure:
- "trainer": the training loop's ``peak_mem_gib``, ``torch.cuda.max_memory_allocated()`` since the process
  started, so it includes building the model (compared with the plan's process peak);
- "bench": train.bench's peak over its timed steps, after ``reset_peak_memory_stats`` (compared with the
  plan's step peak). train.bench builds in bf16 and applies the recipe switches itself; its LoRA cases
  are the trainer's single-GPU LoRA with frozen weights in bf16 (perf.frozen_bf16) and the resampler frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from train.memory import GiB
from train.plan import ModelPlan, Plan, make_plan, plan_model
from train.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
# The issue-11 runs' model: the Qwen-VL shape with random weights and the synthetic world's tokenizer
# (no special token added, so embeddings: auto leaves the embeddings frozen) padded to Qwen's vocabulary.
FULL_SHAPE = ("model.init_from=null", "model.preset=qwen_vl_7b", "model.pad_vocab_to=151936")
# train.bench's LoRA / Q-LoRA "ours": the ViT and the resampler frozen, frozen weights bf16, liger, varlen.
BENCH = (*FULL_SHAPE, "freeze.resampler=frozen", "perf.frozen_bf16=true", "perf.liger_kernels=true",
         "perf.loss_impl=liger", "perf.attention=varlen", "train.grad_accum=1", "parallel.mode=auto")
# launch/gpu_zero_throughput.sh at commit c8e5ed8 (before data.pack_len: rows of at most 2048 tokens).
ZERO = (*FULL_SHAPE, "perf.attention=varlen", "perf.loss_impl=auto", "perf.liger_kernels=true",
        "perf.check_image_spans=false", "train.micro_batch=24", "train.grad_accum=1")
# Issue 11's trainer runs: 16 synthetic SFT samples per micro-batch in rows of 8192. parallel.mode=auto:
# the figures show a fp32 build (train.loop.load_dtype), which only happens outside DeepSpeed.
ISSUE11 = (*FULL_SHAPE, "train.micro_batch=16", "train.grad_accum=1", "data.pack_len=8192", "parallel.mode=auto")


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


MEASUREMENTS = [
    Measurement("LoRA: sft_lora, perf as shipped, one process", "recipes/sft_lora.yaml", ISSUE11, 45.6, "trainer",
                "issue 11, H100", tokens_per_sample=390, images_per_sample=1.1),
    Measurement("LoRA: + frozen_bf16 + liger kernels, one process", "recipes/sft_lora.yaml",
                (*ISSUE11, "perf.frozen_bf16=true", "perf.liger_kernels=true", "perf.check_image_spans=false"),
                36.8, "trainer", "issue 11, H100", tokens_per_sample=390, images_per_sample=1.1),
    Measurement("Q-LoRA: sft_qlora + liger kernels, one process", "recipes/sft_qlora.yaml", (*ISSUE11, "perf.liger_kernels=true"),
                24.9, "trainer", "issue 11, H100", tokens_per_sample=390, images_per_sample=1.1),
    Measurement("LoRA bench, mixed (300-700 tokens), rows of 8192", "recipes/sft_lora.yaml",
                (*BENCH, "data.pack_len=8192", "train.micro_batch=16"), 23.9, "bench", "docs/benchmarks.md, H100",
                tokens_per_sample=500),
    Measurement("LoRA bench, 2048-token samples, rows of 8192", "recipes/sft_lora.yaml",
                (*BENCH, "data.pack_len=8192", "train.micro_batch=4"), 23.5, "bench", "docs/benchmarks.md, H100",
                tokens_per_sample=2048),
    Measurement("Q-LoRA bench, mixed, rows of 4096", "recipes/sft_qlora.yaml",
                (*BENCH, "data.pack_len=4096", "train.micro_batch=8"), 12.7, "bench", "docs/benchmarks.md, H100",
                tokens_per_sample=500),
    Measurement("Q-LoRA bench, 2048-token samples, rows of 8192", "recipes/sft_qlora.yaml",
                (*BENCH, "data.pack_len=8192", "train.micro_batch=4"), 14.7, "bench", "docs/benchmarks.md, H100",
                tokens_per_sample=2048),
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
        return (est.process_peak if self.run.kind == "trainer" else est.peak) / GiB

    @property
    def error(self) -> float:
        return self.planned_gib / self.run.measured_gib - 1

    @property
    def where(self) -> str:
        est = self.plan.estimate
        if self.run.kind == "trainer" and est.startup > est.peak:
            return f"building the model (step peak {est.peak / GiB:.1f})"
        return est.peak_phase


def calibrate(measurements: list[Measurement] = MEASUREMENTS) -> list[Row]:
    """Plan every measured run (a model is built on the meta device once per distinct model section)."""
    models: dict[str, ModelPlan] = {}
    rows = []
    for run in measurements:
        recipe = load_recipe(REPO / run.recipe, list(run.overrides))
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
