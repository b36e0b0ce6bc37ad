"""The training loop for every mode (single process, DDP, ZeRO-2/3, LoRA, Q-LoRA, DPO): ``train`` builds a
``Trainer``, resumes, fits and exports; the Trainer's methods read top to bottom in that order and only call
the components that own each policy (train.assemble, data.loader, train.parallel, train.objectives,
train.checkpoint, train.logger).

Loss of an optimiser step = (sum of token losses over all its micro-batches and ranks) / (number of
supervised tokens over all of them). The step's micro-batches are fetched first so the token count
is known (one all-reduce) before any backward; each micro-batch then back-propagates
``loss_sum * world_size / step_tokens`` (the world_size undoes the mean over ranks that DDP and
DeepSpeed apply to gradients). A mean of per-micro-batch means would over-weight short answers.
The stage's objective (train/objectives.py: this token-weighted cross-entropy, or DPO's pair-weighted
loss, train/dpo.py) is chosen in one place and owns that normalisation.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from data.collate import count_images, split_rows, to_device
from data.dataset import build_dataloader, load_data
from eval_mm.benchmarks import get_benchmark
from eval_mm.datasets import require_file
from eval_mm.prompts import checkpoint_prompt_format
from eval_mm.runner import evaluate, print_summary
from eval_mm.sharding import barrier
from models import load_pretrained
from models.errors import MissingFileError, UserError
from train.assemble import assemble, family_of
from train.budget import BudgetChoice, without_budget
from train.budget import apply as apply_settings
from train.checkpoint import export_final, load_checkpoint, resolve_resume, save_checkpoint
from train.data_check import check_data_at_startup
from train.diagnose import finish_memory_recording, profiled, start_memory_recording
from train.dpo import copy_for_reference
from train.freeze import trainable_table
from train.logger import MetricLogger, peak_flops_per_device
from train.objectives import LanguageModelling, Objective, build_objective, count_supervised
from train.optim import build_optimizer, build_scheduler
from train.parallel import DistInfo, Engine, all_reduce_min, all_reduce_sum, init_distributed, resolve_mode
from train.plan import plan_model, settle_budget
from train.recipe import Recipe, recipe_to_dict, save_resolved

GC_EVERY = 50  # optimiser steps between collections of Python's young generation (automatic gc is off)
PROMPT_FORMAT = {"pretrain": "raw", "multitask": "raw", "sft": "chatml", "dpo": "chatml"}


class NonFiniteLossError(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def micro_batches(loader):
    """Batches forever, epoch after epoch (the loader advances its own epoch at the end of each)."""
    while True:
        yield from loader


NUM_COUNTS = 5  # the loop's own counts, before the objective's (accumulate_gradients)


def accumulate_gradients(
    engine: Engine,
    step_batches: list[dict[str, Any]],
    pixel_dtype: torch.dtype | None = None,
    max_forward_tokens: int | None = None,
    image_start_id: int = -1,
    objective: Objective | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward + backward of one optimiser step's micro-batches (no optimiser step). A micro-batch longer
    than ``max_forward_tokens`` runs as several forwards of whole rows (data.collate.split_rows).

    Gradients end up as d/dθ of the objective's step loss (language modelling by default: sum of token
    losses over all micro-batches and ranks / their supervised-token count). Returns (this rank's sums for
    the objective's metrics, detached, on device; the all-reduced counts [supervised tokens, sample tokens,
    samples, images, sum of squared sample lengths, *the objective's counts] as a float64 device tensor;
    sample tokens exclude row padding).
    """
    objective = objective or LanguageModelling()
    info = engine.dist
    lengths = [n for b in step_batches for n in b["sample_lengths"]]
    local = torch.tensor(
        [
            sum(count_supervised(b) for b in step_batches),
            sum(lengths),
            sum(b["num_samples"] for b in step_batches),
            sum(count_images(b) for b in step_batches),
            sum(n * n for n in lengths),
            *objective.count(step_batches),
        ],
        dtype=torch.float64,
    )
    counts = all_reduce_sum(local.to(info.device))  # the step's one collective before backward
    sums = None
    forwards = [part for b in step_batches for part in split_rows(b, max_forward_tokens, image_start_id)]
    for i, batch in enumerate(forwards):
        last = i == len(forwards) - 1
        batch = to_device(batch, info.device, pixel_dtype)
        with engine.micro_step(last):
            loss, batch_sums = objective(engine, batch, counts[NUM_COUNTS:])
            engine.backward(loss, last)
        sums = batch_sums if sums is None else sums + batch_sums
    return sums, counts


def train(recipe: Recipe) -> Path:
    """Run the recipe; returns the directory of the final export (the run directory when
    ``train.stop_after_steps`` stopped it early)."""
    trainer = Trainer(recipe)
    trainer.resume()
    trainer.fit()
    return trainer.finish()


class Trainer:
    """One run: ``__init__`` builds its parts in the order they depend on each other (processes, data
    check, model, data, optimiser and engine, objective), ``fit`` is the loop, ``finish`` the export.
    Each part's policy lives in its own module; this class only calls them in order and holds the state
    a resume restores (``step``, ``bad_steps``; the engine and the loader own the rest)."""

    def __init__(self, recipe: Recipe):
        # ---- processes, the memory budget, seeds, run directory
        check_paths(recipe)
        check_eval_section(recipe)
        self.info = info = init_distributed(recipe.parallel)
        self.mode = resolve_mode(recipe.parallel, info.world_size)
        recipe, self.budget = settle_memory_budget(recipe, info)
        self.recipe = recipe
        seed_everything(recipe.train.seed)  # identical model init on every rank
        self.run_dir = Path(recipe.checkpoint.out_dir)
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(recipe, self.run_dir / "resolved.yaml")
        # data.check first: it reports every bad record at once (RUN_DIR/data_check.txt), where loading stops
        # at the first; then the records are validated and their images checked, all before any weights load.
        check_data_at_startup(recipe, info.is_main, self.run_dir)
        preference = recipe.train.stage == "dpo"
        records = load_data(recipe.data, preference=preference)

        # ---- model: build, freeze, (quantise), (LoRA), speed switches (train.assemble)
        assembled = assemble(recipe, info.device, self.mode)
        model, vlm = assembled.model, assembled.vlm
        if info.is_main:
            table = trainable_table(model)
            lines = [f"mode {self.mode}, world size {info.world_size}", *assembled.notes, table]
            print("\n".join(lines), flush=True)
        family = family_of(recipe.model)
        self.flops = family.step_flops(vlm, recipe, assembled.adapters)
        frozen_reference = copy_for_reference(model, recipe)  # DPO: before the engine wraps or shards it

        # ---- data: record -> sample in the model's tokens (the builder), samples -> rows (the loader)
        self.builder = family.sample_builder(recipe.data, assembled.tokenizer, vlm)
        self.loader = build_dataloader(
            recipe.data,
            builder=self.builder,
            batch_size=recipe.train.micro_batch,
            batch_tokens=recipe.train.micro_batch_tokens,
            rank=info.rank,
            world_size=info.world_size,
            preference=preference,
            records=records,
        )
        if recipe.train.steps is not None:
            self.total_steps = recipe.train.steps
        else:  # batches bounded by tokens: ranks may form different numbers; all run the fewest
            batches = all_reduce_min(len(self.loader), info.device)
            self.total_steps = max(1, math.floor(recipe.train.epochs * batches / recipe.train.grad_accum))
        self.last_step = min(self.total_steps, recipe.train.stop_after_steps or self.total_steps)

        # ---- optimiser, schedule, parallel engine, the stage's objective
        vit_blocks = vlm.config.vision.layers if recipe.optim.vit_layer_decay != 1.0 else 0  # Qwen-VL only
        optimizer = build_optimizer(model, recipe.optim, num_vit_blocks=vit_blocks)
        scheduler = build_scheduler(optimizer, self.total_steps, recipe.optim.lr, recipe.schedule)
        self.engine = Engine(
            model,
            optimizer,
            scheduler,
            info,
            recipe.parallel,
            recipe.train,
            recipe.optim.clip_grad,
            offload_activations=assembled.perf.offload_activations,
        )
        self.pixel_dtype = torch.bfloat16 if self.engine.uses_deepspeed and recipe.train.bf16 else None
        self.objective = build_objective(
            recipe, self.engine, self.loader, frozen_reference, self.pixel_dtype, self.run_dir
        )
        if self.objective.runs_reference:  # DPO's reference forward is model work too
            self.flops = self.flops + family.reference_flops(
                vlm, vision=self.objective.reference_encodes_images
            )
        if info.is_main and info.device.type == "cuda":  # the step's activations add the rest of the peak
            print(
                f"memory before the first step: {torch.cuda.memory_allocated(info.device) / 2**30:.1f} GiB "
                "allocated (weights and optimiser state; peak so far "
                f"{torch.cuda.max_memory_allocated(info.device) / 2**30:.1f})",
                flush=True,
            )
        self.peak_flops = peak_flops_per_device()  # for MFU
        self.step, self.bad_steps = 0, 0

    def resume(self) -> None:
        """Restore a checkpoint (train.resume: a path, or auto = the newest good one), or start fresh."""
        resume_from = resolve_resume(self.recipe.train.resume, self.run_dir, is_main=self.info.is_main)
        if resume_from is None:
            seed_everything(
                self.recipe.train.seed + self.info.rank
            )  # per-rank streams (dropout) from here on
            return
        trainer_state, loader_state = load_checkpoint(self.engine, resume_from)
        self.loader.load_state_dict(loader_state)
        self.step, self.bad_steps = trainer_state["step"], trainer_state["bad_steps"]
        if self.info.is_main:
            print(f"resumed from {resume_from} at step {self.step}", flush=True)

    def fit(self) -> None:
        """Optimiser steps up to ``last_step``: each one's micro-batches, the step, then logging and
        checkpoints on their schedules."""
        recipe, info = self.recipe, self.info
        self.logger = MetricLogger(recipe.log, self.run_dir, info.is_main, config=recipe_to_dict(recipe))
        self.progress = None
        if info.is_main and recipe.log.progress_bar:
            self.progress = tqdm(
                total=self.total_steps,
                initial=self.step,
                desc=f"train ({recipe.train.stage})",
                dynamic_ncols=True,
            )
        batches = micro_batches(self.loader)
        window = Window()
        self.engine.train()
        # Python's automatic full collections walk every object of the model, optimiser and compiled graphs:
        # 0.3-0.5 s stalls at 7B, at the same steps of every run. Freeze what exists now, collect the young
        # generation ourselves every GC_EVERY steps (as torchtitan does).
        gc.collect()
        gc.freeze()
        gc.disable()
        start_memory_recording(info.is_main)  # VLRECIPE_MEMORY_STEP (train/diagnose.py); off by default
        while self.step < self.last_step:
            # The step's micro-batches come first: their supervised-token (or pair) count normalises the loss.
            step_batches = [next(batches) for _ in range(recipe.train.grad_accum)]
            lr, grad_norm = self.train_step(step_batches, window)
            if self.step % GC_EVERY == 0:
                gc.collect(1)
            if self.progress is not None:
                self.progress.update(1)
            # The first step is logged too: it shows the run is alive and when training really began.
            if self.step % recipe.log.every == 0 or self.step == self.last_step or self.step == 1:
                self.log(window, lr, grad_norm)
                window = Window()
            if (
                recipe.checkpoint.every
                and self.step % recipe.checkpoint.every == 0
                and self.step < self.total_steps
            ):
                self.save()
        gc.enable()
        if self.progress is not None:
            self.progress.close()
        self.logger.close()

    def train_step(self, step_batches: list[dict[str, Any]], window: Window) -> tuple[float, torch.Tensor]:
        """Forward and backward of the step's micro-batches, then the optimiser step (skipped, and counted,
        when the gradient norm is not finite). Returns the lr the step applied and the gradient norm
        (a device tensor: no sync here)."""
        with profiled(self.step + 1, self.info.is_main):
            sums, counts = accumulate_gradients(
                self.engine,
                step_batches,
                self.pixel_dtype,
                self.recipe.train.max_forward_tokens,
                self.builder.img_start,
                self.objective,
            )
        window.add(sums, counts)
        lr = self.engine.lr()  # the lr this step applies (the schedule advances inside engine.step)
        grad_norm, applied = self.engine.step()
        self.step += 1
        finish_memory_recording(self.step, self.info.is_main)
        if not applied:
            self.bad_steps += 1
            if self.info.is_main:
                print(
                    f"step {self.step}: non-finite gradient norm, step skipped ({self.bad_steps} so far)",
                    flush=True,
                )
            if self.bad_steps > self.recipe.train.max_bad_steps:
                raise NonFiniteLossError(
                    f"{self.bad_steps} skipped non-finite steps exceed train.max_bad_steps="
                    f"{self.recipe.train.max_bad_steps}; lower the lr or check the data"
                )
        return lr, grad_norm

    def log(self, window: Window, lr: float, grad_norm: torch.Tensor) -> None:
        """One metrics line for the window's steps: the only host syncs of the loop besides the NaN guard."""
        info = self.info
        sums = all_reduce_sum(window.sums.clone())
        _supervised, inputs, samples, images, sum_sq, *own = window.counts.tolist()
        elapsed = time.perf_counter() - window.start
        metrics = {
            **self.objective.metrics(sums.tolist(), own),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": inputs / elapsed,
            "tokens": inputs,  # sample tokens of the window (row padding excluded), over all ranks
            "window_s": elapsed,
            "time": time.time(),  # wall clock: start-up time = first step's time - process start
            "samples_per_s": samples / elapsed,
            "skipped_steps": self.bad_steps,
        }
        if self.peak_flops is not None:
            metrics["mfu"] = (
                self.flops(inputs, images, sum_sq) / elapsed / (self.peak_flops * info.world_size)
            )
        if info.device.type == "cuda":
            metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(info.device) / 2**30  # this rank's
            warning = self.budget.peak_warning(metrics["peak_mem_gib"]) if self.budget is not None else None
            if warning and info.is_main:
                print(warning, flush=True)
                self.budget = None  # said once
        self.logger.log(metrics, self.step, console=self.progress is None)
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")

    def save(self) -> None:
        trainer_state = {"bad_steps": self.bad_steps, "total_steps": self.total_steps}
        save_checkpoint(
            self.engine,
            self.run_dir,
            self.step,
            trainer_state,
            self.loader.state_dict(),
            self.recipe.checkpoint.keep_last,
        )

    def finish(self) -> Path:
        """The final export (and its evaluation, eval.benches), unless the run stopped early on purpose."""
        if self.info.is_main:
            print(f"data: {self.loader.stats.total}", flush=True)
        if self.step < self.total_steps:  # train.stop_after_steps
            return self.run_dir
        stage = self.recipe.train.stage
        training_info = {
            "stage": stage,
            "prompt_format": PROMPT_FORMAT[stage],
            "steps": self.step,
            "skipped_steps": self.bad_steps,
            "init_from": _absolute(self.recipe.model.init_from),
            "data_stats": dict(self.loader.stats.total),
        }
        export = export_final(
            self.engine, self.run_dir / "final", training_info, merge_lora=self.recipe.lora.merge_on_export
        )
        if self.info.is_main:
            print(f"exported {export}", flush=True)
        if self.recipe.eval.benches:
            evaluate_export(self.recipe, export, self.info)
        return export


class Window:
    """The steps since the last log line: their objective sums and counts (device tensors, added without
    a sync) and the time they took."""

    def __init__(self):
        self.start = time.perf_counter()
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def add(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        self.sums = sums if self.sums is None else self.sums + sums
        self.counts = counts if self.counts is None else self.counts + counts


def settle_memory_budget(recipe: Recipe, info: DistInfo) -> tuple[Recipe, BudgetChoice | None]:
    """The recipe's ``auto`` activation settings filled in: chosen on rank 0 for train.memory_budget and the
    GPU's memory (train/budget.py, one log line), the same choice on every rank; without a budget or a GPU,
    their values without one."""
    if recipe.train.memory_budget is not None and info.device.type != "cuda":
        if info.is_main:
            print(
                "train.memory_budget: off (no CUDA device): every decoder layer checkpointed, no offload, "
                "forwards of one packed row",
                flush=True,
            )
        recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, memory_budget=None))
    if recipe.train.memory_budget is None:
        return without_budget(recipe), None
    chosen: list[BudgetChoice | None] = [None]
    if info.is_main:
        gpu_mem_gib = torch.cuda.get_device_properties(info.device).total_memory / 2**30
        chosen[0] = settle_budget(recipe, plan_model(recipe), info.world_size, gpu_mem_gib, "recipe")[1]
        print(chosen[0].line, flush=True)
    if info.world_size > 1:  # every rank must run the same forwards and checkpoint the same layers
        torch.distributed.broadcast_object_list(chosen, src=0)
    return apply_settings(recipe, chosen[0].settings), chosen[0]


def _absolute(path: str | None) -> str | None:
    """init_from as an absolute path: models.load_pretrained finds an adapter's base from any directory."""
    return None if path is None else str(Path(path).resolve())


def check_paths(recipe: Recipe) -> None:
    """Fail at once, naming the key, when a file or directory the recipe names does not exist."""
    m = recipe.model
    named = {
        "model.init_from": m.init_from,
        "model.llm_path": m.llm_path,
        "model.tokenizer_path": m.tokenizer_path,
        "model.openclip_checkpoint": m.openclip_checkpoint,
        "parallel.deepspeed_config": recipe.parallel.deepspeed_config,
    }
    if recipe.train.resume not in (None, "auto"):
        named["train.resume"] = recipe.train.resume
    for key, value in named.items():
        if value is not None and not Path(value).exists():
            raise MissingFileError(f"{key}={value}: no such file or directory")


def check_eval_section(recipe: Recipe) -> None:
    """Fail before training, not after, when the recipe's eval section cannot run on the export."""
    if not recipe.eval.benches:
        return
    if recipe.eval.data_root is None:
        raise UserError("eval.benches is set but eval.data_root is not (the folder holding e.g. synthetic/)")
    if recipe.lora.enabled and not recipe.lora.merge_on_export and recipe.model.init_from is None:
        raise UserError(
            "eval.benches with a LoRA export needs the base the adapter goes on: set model.init_from "
            "(or lora.merge_on_export: true)"
        )
    for name in recipe.eval.benches:
        bench = get_benchmark(name)  # unknown name -> UserError listing the known ones
        for file in dict.fromkeys((bench.test_file, bench.references_file)):
            require_file(Path(recipe.eval.data_root) / file, f"eval.benches {name} (eval.data_root)")


def evaluate_export(recipe: Recipe, export: Path, info: DistInfo) -> dict[str, dict[str, Any]]:
    """Evaluate the final export on ``recipe.eval.benches``, data-parallel over the training ranks.

    The export is reloaded (rather than the in-memory model evaluated) so the figures are those of
    the files eval_mm would read, with their prompt format (ChatML after SFT); under ZeRO-3 it is
    also the only copy with whole weights. Rank 0 prints the table and writes EXPORT/metrics.json.
    """
    eval_dir = Path(recipe.checkpoint.out_dir) / "eval"
    if info.is_main:  # eval_mm resumes from the predictions it finds: drop those of an earlier run
        shutil.rmtree(eval_dir, ignore_errors=True)
    barrier()
    model, tokenizer = load_pretrained(export, device=info.device)  # an adapter goes on init_from, merged
    prompt_format = checkpoint_prompt_format(export)
    e = recipe.eval
    results = evaluate(
        model,
        tokenizer,
        e.benches,
        e.data_root,
        eval_dir,
        limit=e.limit,
        batch_size=e.batch_size,
        prompt_format=prompt_format,
        progress=False,
    )
    if info.is_main:
        (export / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nevaluation of {export} ({recipe.train.stage}, {prompt_format} prompts)", end="")
        print_summary(results)
    return results
