"""The planner against every GPU memory measurement we have: ``vlrecipe calibrate`` (``python -m
train.plan_calibration``) prints the table of docs/benchmarks.md (measured, planned, error);
tests/test_train_plan.py holds each run within 15%.

The measurements are data, in train/plan_calibration.json: each run as the recipe and overrides it ran
with (named override sets written once, ``"@NAME"``), the GiB measured, the kind of figure and its source.
Three kinds of figure:
- "trainer": the training loop's ``peak_mem_gib``, ``torch.cuda.max_memory_allocated()`` since the process
  started, so it includes building the model (compared with the plan's process peak); ``vlrecipe bench``
  reports the same figure;
- "bench": the former standalone train.bench's peak over its timed steps, after ``reset_peak_memory_stats``
  (compared with the plan's step peak);
- "build": the peak before the first step (the trainer prints it), compared with the plan's start-up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from models.errors import ArgumentParser, run_cli
from train.memory import GiB
from train.plan import ModelPlan, Plan, make_plan, plan_model
from train.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
CALIBRATION_FILE = Path(__file__).with_name("plan_calibration.json")
# Every run here predates train.memory_budget: the recipes set their activation settings by hand, as here.
BEFORE_THE_BUDGET = {
    "recipes/sft_lora.yaml": ("perf.offload_activations=true", "train.max_forward_tokens=8192"),
    "recipes/sft_qlora.yaml": ("perf.offload_activations=false", "train.max_forward_tokens=8192"),
    "recipes/dpo_lora.yaml": ("train.max_forward_tokens=8192",),
}


@dataclass(frozen=True)
class Measurement:
    name: str
    recipe: str
    overrides: tuple[str, ...]
    measured_gib: float
    kind: str  # "trainer" | "bench" | "build"
    source: str
    gpus: int = 1
    tokens_per_sample: float = 390.0
    images_per_sample: float = 1.0
    superseded: str = ""  # the trainer has changed since; the figure is checked against what explains it


def load_measurements(path: Path = CALIBRATION_FILE) -> list[Measurement]:
    """The runs of a calibration file, each ``"@NAME"`` replaced by the override set NAME (sets may nest)."""
    data = json.loads(path.read_text())
    sets = data["override_sets"]

    def expand(items: list[str]) -> list[str]:
        expanded = []
        for item in items:
            expanded += expand(sets[item[1:]]["overrides"]) if item.startswith("@") else [item]
        return expanded

    runs = data["measurements"]
    return [Measurement(**(run | {"overrides": tuple(expand(run["overrides"]))})) for run in runs]


MEASUREMENTS = load_measurements()


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
            return (
                f"{self.run.superseded}: {self.explained_gib:.1f} GiB "
                f"({percent(self.explained_gib / self.run.measured_gib - 1)})"
            )
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
        key = repr(
            (
                recipe.model,
                recipe.freeze,
                recipe.lora,
                recipe.quantization,
                recipe.optim,
                recipe.data.image_size,
                recipe.data.min_pixels,  # a family's image sizes (the model plan's per-image shapes)
                recipe.data.max_pixels,
            )
        )
        if key not in models:
            models[key] = plan_model(recipe, run.recipe)
        plan = make_plan(
            recipe,
            run.recipe,
            gpus=run.gpus,
            tokens_per_sample=run.tokens_per_sample,
            images_per_sample=run.images_per_sample,
            model=models[key],
        )
        rows.append(Row(run, plan))
    return rows


def percent(x: float) -> str:
    return f"{round(100 * x, 1) + 0.0:+.1f}%"  # + 0.0: no "-0.0%"


def markdown(rows: list[Row]) -> str:
    lines = [
        "| run | measured GiB | planned GiB | error | planned peak at | source |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.run.name} | {r.run.measured_gib:.1f} ({r.run.kind}) | {r.planned_gib:.1f} | "
            f"{percent(r.error)} | {r.where} | {r.run.source} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "python -m train.plan_calibration") -> None:
    p = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], examples=[""])
    p.parse_args(argv)
    print(markdown(calibrate()))


if __name__ == "__main__":
    run_cli(main)
