"""evaluate(): run benchmarks with an already-loaded model, resumable and data-parallel.

Per benchmark, under out_dir/<bench>/:
  predictions.jsonl         every predicted sample, in dataset order: id, prediction, prompt, raw_output
  predictions.part<R>.jsonl what rank R predicted in an unfinished run (read back on resume)
  run_info.json             the prompt format used (a resume with another one is refused)
  metrics.json              the metrics of the samples evaluated in this call
"""

import json
import os
import random
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from eval_mm.benchmarks import Benchmark, get_benchmark
from eval_mm.datasets import EvalSample, load_references, load_samples
from eval_mm.family import (
    FamilyBatchBuilder,
    FamilyPairBatchBuilder,
    check_family_prompt_format,
    generate_family_answers,
    rank_family_options,
    score_family_pairs,
)
from eval_mm.inference import BatchBuilder, PromptBatch, StaticCacheSlot, generate_answers, rank_options
from eval_mm.metrics import MetricOptions, compute_metric
from eval_mm.predictions import PARTS, PREDICTIONS, part_file, read_predictions
from eval_mm.preference import PairBatchBuilder, score_pairs
from eval_mm.sharding import barrier, broadcast_from_rank0, gather_to_all, shard_range, world
from models.errors import UserError
from models.loading import base_vlm, is_family_model
from models.tokens import IMG_START

SEED = 0


def evaluate(
    model,
    tokenizer,
    benches: list[Benchmark] | list[str],
    data_root: str | Path,
    out_dir: str | Path,
    limit: int | None = None,
    batch_size: int = 32,
    prompt_format: str = "raw",
    metric_options: MetricOptions = MetricOptions(),
    num_workers: int | None = None,
    progress: bool = True,
    static_cache: bool | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate `model` on each benchmark; returns {bench: {metric: value}} on every rank.

    `model` may be a Hugging Face family model (models.load_pretrained of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL
    export), `tokenizer` then its processor: the same benchmarks and metrics, prompts in the family's chat
    template (eval_mm.family).

    Under torch.distributed each rank predicts a contiguous shard of the samples not yet predicted;
    rank 0 merges and scores. `model` must already be on its device and in eval mode.
    num_workers: DataLoader workers that tokenise and decode images while the model runs; None = 4 with
    CUDA, 0 on CPU. static_cache: generation reuses one transformers StaticCache per benchmark, so that on
    CUDA transformers compiles the decode step with CUDA graphs (eval_mm.inference.StaticCacheSlot); None =
    on with CUDA. Predictions do not depend on either, nor on batch_size.
    """
    benches = [get_benchmark(b) if isinstance(b, str) else b for b in benches]
    results = {}
    for bench in benches:
        results[bench.name] = _evaluate_one(
            model,
            tokenizer,
            bench,
            Path(data_root),
            Path(out_dir) / bench.name,
            limit,
            batch_size,
            prompt_format,
            metric_options,
            num_workers,
            progress,
            static_cache,
        )
    return results


def _evaluate_one(
    model,
    tokenizer,
    bench: Benchmark,
    data_root: Path,
    bench_dir: Path,
    limit: int | None,
    batch_size: int,
    prompt_format: str,
    metric_options: MetricOptions,
    num_workers: int | None,
    progress: bool,
    static_cache: bool | None,
) -> dict[str, Any]:
    rank, world_size = world()
    random.seed(SEED)
    torch.manual_seed(SEED)
    samples = load_samples(bench, data_root)
    if limit is not None:
        samples = samples[:limit]
    references = load_references(bench, data_root / bench.references_file)
    missing = [s.id for s in samples if s.id not in references]
    if missing:
        raise UserError(
            f"{bench.name}: {len(missing)} samples have no annotation in "
            f"{data_root / bench.references_file} (e.g. {missing[:5]})"
        )
    if rank == 0:
        _check_run_info(bench_dir, prompt_format)
    barrier()

    # Rank 0 reads what is done and tells the others, so every rank shards the same list.
    done = broadcast_from_rank0(read_predictions(bench_dir) if rank == 0 else None)
    todo = [s for s in samples if s.id not in done]
    mine = [todo[i] for i in shard_range(len(todo), rank, world_size)]
    new_records = _predict(
        model,
        tokenizer,
        bench,
        mine,
        part_file(bench_dir, rank),
        batch_size,
        prompt_format,
        num_workers,
        progress and rank == 0,
        static_cache,
    )
    new_records = gather_to_all(new_records)

    metrics = None
    if rank == 0:
        merged = {**done, **{r["id"]: r for r in new_records}}
        order = {s.id: i for i, s in enumerate(samples)}
        _write_jsonl(
            bench_dir / PREDICTIONS,
            sorted(merged.values(), key=lambda r: order.get(r["id"], len(order))),
        )
        for part in bench_dir.glob(PARTS):
            part.unlink()
        predictions = {s.id: merged[s.id]["prediction"] for s in samples}
        metrics = compute_metric(
            bench.metric,
            predictions,
            {s.id: references[s.id] for s in samples},
            metric_options,
            where=bench.name,
        )
        metrics["num_resumed"] = sum(1 for s in samples if s.id in done)
        (bench_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    metrics = broadcast_from_rank0(metrics)
    barrier()
    return metrics


def estimated_prompt_tokens(sample: EvalSample, num_image_tokens: int) -> int:
    """A cheap estimate of a prompt's length in tokens (about 4 characters a token), for sorting only."""
    return sample.text.count(IMG_START) * (num_image_tokens + 2) + len(sample.text) // 4


def _predict(
    model,
    tokenizer,
    bench: Benchmark,
    samples: list[EvalSample],
    part_file: Path,
    batch_size: int,
    prompt_format: str,
    num_workers: int | None,
    progress: bool,
    static_cache: bool | None,
) -> list[dict]:
    """Predict `samples`, appending each batch's records to part_file as soon as it is done.

    Samples go longest prompt first, so a batch holds prompts of similar length (little padding) and the
    first batch is the longest (a static KV cache sized for it fits every later batch). Records are put
    back in dataset order when the parts are merged.
    """
    if not samples:
        return []
    device = next(model.parameters()).device
    family = is_family_model(model)
    # A family's image spans follow each image's size; the text alone orders its prompts well enough.
    num_image_tokens = 0 if family else model.config.num_image_tokens
    samples = sorted(samples, key=lambda s: -estimated_prompt_tokens(s, num_image_tokens))
    builder = _batch_builder(model, tokenizer, bench, prompt_format)
    on_cuda = device.type == "cuda"
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1) if on_cuda else 0
    loader = DataLoader(
        samples,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=builder,
        num_workers=num_workers,
        pin_memory=on_cuda,
    )
    if static_cache is None:
        static_cache = on_cuda
    rows = min(batch_size, len(samples))
    use_cache = static_cache and bench.kind == "generate" and not family  # a family: HF's own cache
    cache = StaticCacheSlot(model.llm.config, rows) if use_cache else None
    records = []
    part_file.parent.mkdir(parents=True, exist_ok=True)
    with open(part_file, "a", encoding="utf-8") as out:
        for batch in tqdm(loader, desc=bench.name, disable=not progress):
            for record in _predict_batch(model, tokenizer, bench, batch, prompt_format, device, cache):
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                records.append(record)
            out.flush()
    return records


def _batch_builder(model, tokenizer, bench: Benchmark, prompt_format: str):
    """The collate function of a benchmark: the Qwen-VL model's, or a family's (``tokenizer`` is then its
    processor, eval_mm.family)."""
    if is_family_model(model):
        check_family_prompt_format(prompt_format)
        convention = base_vlm(model).spec.box_convention
        if bench.kind == "preference":
            return FamilyPairBatchBuilder(tokenizer, bench.name, convention)
        return FamilyBatchBuilder(tokenizer, bench, convention)
    config = model.config
    if bench.kind == "preference":
        return PairBatchBuilder(tokenizer, bench.name, config.num_image_tokens, config.vision.image_size)
    return BatchBuilder(tokenizer, bench, prompt_format, config.num_image_tokens, config.vision.image_size)


def _predict_batch(
    model, tokenizer, bench, batch: PromptBatch | dict, prompt_format, device, cache: StaticCacheSlot | None
) -> list[dict]:
    family = is_family_model(model)
    if bench.kind == "preference":  # batch: a dict of pairs (eval_mm.preference); prediction: the margin
        margins = score_family_pairs(model, batch, device) if family else score_pairs(model, batch, device)
        return [
            {"id": s.id, "prediction": margin, "prompt": s.text, "raw_output": None}
            for s, margin in zip(batch["samples"], margins, strict=True)
        ]
    if bench.kind == "choice":
        ranked = rank_family_options(model, batch, device) if family else rank_options(model, batch, device)
        return [
            {"id": s.id, "prediction": letter, "prompt": p, "raw_output": None, "option_losses": losses}
            for s, p, (letter, losses) in zip(batch.samples, batch.prompts, ranked, strict=True)
        ]
    if family:  # the prediction in our box markup, the raw output in the family's own convention
        answers = generate_family_answers(model, tokenizer, batch, bench, device)
    else:
        answers = [
            (a, a)
            for a in generate_answers(
                model, tokenizer, batch, bench, prompt_format, device, static_cache=cache
            )
        ]
    return [
        {"id": s.id, "prediction": answer, "prompt": p, "raw_output": raw}
        for s, p, (answer, raw) in zip(batch.samples, batch.prompts, answers, strict=True)
    ]


def _check_run_info(bench_dir: Path, prompt_format: str) -> None:
    info_file = bench_dir / "run_info.json"
    if info_file.exists():
        previous = json.loads(info_file.read_text()).get("prompt_format")
        if previous != prompt_format:
            raise UserError(
                f"{bench_dir} holds predictions made with prompt format {previous!r}, not "
                f"{prompt_format!r}; use another --out directory"
            )
    bench_dir.mkdir(parents=True, exist_ok=True)
    info_file.write_text(json.dumps({"prompt_format": prompt_format}) + "\n")


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)


def print_summary(results: dict[str, dict]) -> None:
    """The metrics of `evaluate` as a table, one benchmark per line (the CLI's and the trainer's)."""
    print(f"\n{'benchmark':24} {'samples':>8}  metrics")
    for bench, metrics in results.items():
        shown = {k: v for k, v in metrics.items() if "/" not in k and k not in ("num_samples",)}
        text = "  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        print(f"{bench:24} {metrics.get('num_samples', 0):>8}  {text}")
