"""Training-throughput benchmark at the real Qwen-VL shape: our path against the plain Hugging Face path.

    python -m train.bench --cases lora qlora --workloads mixed 2048 --steps 8 --out bench.json

Random weights at ``models.presets.qwen_vl_7b`` (ViT-bigG/14 448 px, 256-query resampler, Qwen-7B-shaped
decoder), bf16 weights, one GPU, synthetic token batches built on the host (the DataLoader is measured
apart: ``python -m data.bench_loader``). For every case x workload it runs

- ``hf``: the anchor, the way the reference finetune.py trains: decoder attention SDPA, gradient
  checkpointing on every layer, labels into the HF model's own loss (full fp32 logits), one padded
  sample per step, fused AdamW;
- ``ours`` (one or more variants, ``--variants``): packed rows of ``--pack-len`` tokens with attention
  confined to each sample, the fused linear cross-entropy (models.loss), frozen modules under no_grad,
  checkpointing of ``--ckpt-layers`` decoder layers, compiled vision blocks, no image-span sync;

and prints tokens/s, samples/s, MFU and peak memory side by side (and writes them to ``--out`` as JSON).

MFU convention (train/flops.py, shared with the training loop): matmul FLOPs of the model, 2 per
multiply-add; per token 2N forward, +4N backward for weights that train, +2N backward for frozen weights
that gradient flows through (input gradients only), nothing for modules no gradient reaches (a frozen
ViT: forward only); causal attention 2*s^2*d per layer per sample forward, x3 with backward.
Recomputation by checkpointing and Q-LoRA dequantisation are not counted (they are overhead). Peak: 989 TFLOP/s dense
bf16 (H100/H200 SXM datasheet); ``--peak-tflops`` overrides (e.g. 780, the measured matmul rate).
Tokens counted are real sample tokens (image slots included, row padding excluded).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass, field

import torch

from train.flops import step_flops
from train.perf import apply_perf_switches

IGNORE_INDEX = -100
GiB = 2**30


# ------------------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Case:
    name: str
    vision: str = "frozen"  # train | frozen
    resampler: str = "frozen"
    llm: str = "frozen"
    lora: bool = False
    qlora: bool = False
    image_size: int = 448
    llm_layers: int | None = None  # None = the preset's 32; full SFT on one GPU needs fewer
    why: str = ""


CASES = {
    "lora": Case("lora", lora=True, why="SFT LoRA r=64 on q,k,v,o,gate,up; ViT + resampler frozen"),
    "qlora": Case("qlora", lora=True, qlora=True, why="SFT Q-LoRA: NF4 decoder, double quant, bf16 compute"),
    "full": Case("full", resampler="train", llm="train", llm_layers=8,
                 why="full SFT, ViT frozen; 8 of 32 decoder layers (7.7B + AdamW needs ZeRO over GPUs)"),
    "pretrain": Case("pretrain", vision="train", resampler="train", image_size=224,
                     why="stage 1: LLM frozen, ViT + resampler train, 224 px"),
}


@dataclass(frozen=True)
class Variant:
    """One way of running a step. ``hf`` is the anchor; the others are ours."""

    name: str
    hf_loss: bool = False  # labels into the HF model's own loss
    pack: bool = True  # several samples per row, attention confined by position_ids
    attn: str = "sdpa"  # sdpa | flex_attention | varlen
    loss_impl: str = "liger"
    ckpt_layers: int | None = None  # decoder layers checkpointed (None = all)
    compile_vision: bool = False
    compile_llm: bool = False
    liger_kernels: bool = False  # liger's RMSNorm / RoPE / SwiGLU kernels in the decoder
    frozen_bf16: bool = False  # Q-LoRA: keep non-quantised frozen weights bf16 (peft upcasts them to fp32)
    check_spans: bool = False

    @property
    def one_way(self) -> bool:
        """Switches that cannot be undone on a built model: such variants run after the others."""
        return self.compile_vision or self.compile_llm or self.liger_kernels or self.frozen_bf16


def variants_from_args(a) -> list[Variant]:
    ours = Variant("ours", attn=a.attn, loss_impl=a.loss_impl, ckpt_layers=a.ckpt_layers,
                   compile_vision=a.compile_vision, compile_llm=a.compile_llm, liger_kernels=a.liger_kernels,
                   frozen_bf16=True)
    table = {
        "hf": Variant("hf", hf_loss=True, pack=False, loss_impl="torch", check_spans=True),
        # One optimisation at a time on top of the anchor, then everything ("ours").
        "hf+liger": Variant("hf+liger", pack=False, loss_impl="liger", check_spans=True),
        "pack-sdpa": Variant("pack-sdpa", attn="sdpa", loss_impl=a.loss_impl, ckpt_layers=a.ckpt_layers),
        "pack-flex": Variant("pack-flex", attn="flex_attention", loss_impl=a.loss_impl, ckpt_layers=a.ckpt_layers),
        "pack-varlen": Variant("pack-varlen", attn="varlen", loss_impl=a.loss_impl, ckpt_layers=a.ckpt_layers),
        "ours-chunked": dataclasses.replace(ours, name="ours-chunked", loss_impl="chunked"),
        "ours-nocompile": dataclasses.replace(ours, name="ours-nocompile", compile_vision=False, compile_llm=False,
                                              liger_kernels=False, frozen_bf16=False),
        "ours+cvision": dataclasses.replace(ours, name="ours+cvision", compile_vision=True, compile_llm=False,
                                            liger_kernels=False, frozen_bf16=False),
        "ours+liger": dataclasses.replace(ours, name="ours+liger", compile_llm=False, liger_kernels=True),
        "ours+cllm": dataclasses.replace(ours, name="ours+cllm", compile_llm=True),
        "ours": ours,
    }
    unknown = [v for v in a.variants if v not in table]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(table)}")
    chosen = [table[v] for v in a.variants]
    return sorted(chosen, key=lambda v: v.one_way)  # stable: the given order otherwise


# --------------------------------------------------------------------------------------- workloads
def sample_lengths(workload: str, n: int, gen: torch.Generator) -> list[int]:
    if workload == "mixed":  # realistic SFT samples: 300-700 tokens each, one 448 px image (258 of them)
        return torch.randint(300, 701, (n,), generator=gen).tolist()
    return [int(workload)] * n  # e.g. "2048": every sample exactly that long


def make_sample(length: int, num_image_tokens: int, ids, vocab_text: int, gen: torch.Generator) -> dict:
    """A sample: a short prompt, one image span, more prompt, then a supervised answer (last third)."""
    span = [ids.image_start_id] + [ids.image_pad_id] * num_image_tokens + [ids.image_end_id]
    text = torch.randint(0, vocab_text, (length - len(span),), generator=gen)
    input_ids = torch.cat([text[:8], torch.tensor(span), text[8:]])
    labels = input_ids.clone()
    labels[: length - max(1, (length - len(span)) // 3)] = IGNORE_INDEX  # prompt + image unsupervised
    labels[0] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels}


def make_batches(workload: str, variant: Variant, steps: int, pack_len: int, cfg, image_size: int,
                 seed: int = 0) -> list[dict]:
    """Host-side batches for ``steps`` steps: one sample per step (anchor) or one packed row per step."""
    from data.packing import pack, pad

    gen = torch.Generator().manual_seed(seed)
    vocab_text = min(cfg.image_start_id, cfg.text_config["vocab_size"]) - 16
    per_row = 1
    if variant.pack:
        per_row = max(1, pack_len // (500 if workload == "mixed" else int(workload)))
    lengths = sample_lengths(workload, steps * per_row * 2, gen)
    samples = [make_sample(n, cfg.num_image_tokens, cfg, vocab_text, gen) for n in lengths]
    batches, i = [], 0
    while len(batches) < steps:
        if variant.pack:
            row, used = [], 0
            while i < len(samples) and used + len(samples[i]["input_ids"]) <= pack_len:
                row.append(samples[i])
                used += len(samples[i]["input_ids"])
                i += 1
            batch = pack(row, pack_len, cfg.pad_token_id or 0)
        else:
            row = [samples[i]]
            i += 1
            batch = pad(row, cfg.pad_token_id or 0)
        batch["pixel_values"] = torch.randn(len(row), 3, image_size, image_size, generator=gen)
        batch["num_samples"] = len(row)
        batch["sample_lengths"] = [len(s["input_ids"]) for s in row]
        batches.append(batch)
    return batches


# ----------------------------------------------------------------------------------------- FLOPs
def model_flops(vlm, case: Case, sample_lengths: list[int]) -> float:
    """Model FLOPs of one step (train.flops: the convention the training loop's MFU uses too)."""
    tc = vlm.config.text_config
    d, ffn = tc["hidden_size"], tc["intermediate_size"]
    lora_params = tc["num_hidden_layers"] * 64 * (4 * (d + d) + 2 * (d + ffn)) if case.lora else 0  # r=64
    rates = step_flops(vlm.config, vision_trains=case.vision == "train", resampler_trains=case.resampler == "train",
                       llm_trains=case.llm == "train", lora_params=lora_params)
    return rates(sum(sample_lengths), len(sample_lengths), sum(s * s for s in sample_lengths))


# ----------------------------------------------------------------------------------------- model
def build_case_model(case: Case, device: torch.device, preset: str):
    """The VLM of ``case`` in bf16 on ``device``, frozen / quantised / LoRA-wrapped like the trainer does."""
    from models import build_vlm, presets
    from train.freeze import apply_freezing
    from train.recipe import FreezeSection, LoraSection, QuantizationSection

    cfg = getattr(presets, preset)(vocab_size=151936 if preset == "qwen_vl_7b" else 700)
    if preset == "tiny":
        cfg.image_start_id, cfg.image_end_id, cfg.image_pad_id, cfg.pad_token_id = 690, 691, 692, 0
    cfg.vision.image_size = case.image_size
    if case.llm_layers is not None and preset == "qwen_vl_7b":
        cfg.text_config["num_hidden_layers"] = case.llm_layers
    torch.manual_seed(0)
    vlm = build_vlm(cfg, dtype=torch.bfloat16, device=device)
    freeze = FreezeSection(vision=case.vision, resampler=case.resampler, llm=case.llm, embeddings="frozen")
    if case.llm == "train":
        freeze = dataclasses.replace(freeze, embeddings="train")
    apply_freezing(vlm, freeze)
    if case.qlora:
        from train.lora import quantize_llm_4bit

        quantize_llm_4bit(vlm, QuantizationSection(enabled=True), device)
    model = vlm
    if case.lora:
        from train.lora import apply_lora

        model = apply_lora(vlm, LoraSection(enabled=True, r=64, alpha=16, dropout=0.05), freeze, False)
    return model, vlm


def configure(vlm, variant: Variant, case: Case) -> None:
    """Apply a variant's switches to a built VLM (all reversible except compilation and liger kernels)."""
    from train.recipe import PerfSection

    perf = PerfSection(loss_impl=variant.loss_impl, attention=variant.attn, checkpoint_llm_layers=variant.ckpt_layers,
                       liger_kernels=variant.liger_kernels, compile_llm=variant.compile_llm,
                       compile_vision=variant.compile_vision, frozen_bf16=variant.frozen_bf16,
                       check_image_spans=variant.check_spans)
    vlm.set_gradient_checkpointing(True, llm_layers=perf.checkpoint_llm_layers)
    vlm.vision.gradient_checkpointing = case.vision == "train"
    apply_perf_switches(vlm, perf)


def hf_loss_forward(vlm, batch: dict):
    """The anchor's forward: the VLM's embeddings into the HF causal LM with labels (its own loss)."""
    embeds = vlm.embed(batch["input_ids"], batch["pixel_values"])
    return vlm.llm(inputs_embeds=embeds, attention_mask=batch.get("attention_mask"),
                   position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False).loss


def profile_step(fn, title: str) -> None:
    """Print where one step's GPU time goes (top kernels by CUDA time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"\n-- profile of one step: {title}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))


def count_syncs(fn) -> int:
    """Host-device synchronisations during ``fn()`` (torch's sync debug mode, CUDA only)."""
    if not torch.cuda.is_available():
        return -1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


# ------------------------------------------------------------------------------------------- run
@dataclass
class Result:
    case: str
    workload: str
    variant: str
    steps: int
    s_per_step: float
    tokens_per_s: float
    samples_per_s: float
    mfu: float
    peak_gib: float
    reserved_gib: float
    syncs_per_step: int
    loss_first: float
    error: str = ""
    settings: dict = field(default_factory=dict)


def run_variant(model, vlm, case: Case, variant: Variant, workload: str, a, device) -> Result:
    configure(vlm, variant, case)
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda" and all(p.dtype in (torch.float32, torch.bfloat16) for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=fused)
    batches = make_batches(workload, variant, a.warmup + a.steps + 1, a.pack_len, vlm.config, case.image_size)
    on_device = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in b.items()}
                 for b in batches]

    def step(batch: dict) -> torch.Tensor:
        inputs = {k: batch.get(k) for k in ("input_ids", "pixel_values", "attention_mask", "position_ids", "labels")}
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        with torch.autocast(device.type, dtype=torch.bfloat16):  # as the trainer (and HF Trainer bf16=True)
            if variant.hf_loss:
                loss = hf_loss_forward(vlm, inputs)
            else:
                out = model(**inputs)
                # The trainer divides by the step's supervised-token count, known on the host: no sync.
                loss = out.loss_sum / batch["num_supervised"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for b, host in zip(on_device, batches):
        b["num_supervised"] = max(1, int((host["labels"][:, 1:] != IGNORE_INDEX).sum()))
    model.train()
    first = step(on_device[0])
    for b in on_device[1 : a.warmup]:
        step(b)
    syncs = count_syncs(lambda: step(on_device[a.warmup]))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timed = on_device[a.warmup + 1 : a.warmup + 1 + a.steps]
    start = time.perf_counter()
    for b in timed:
        step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if a.profile and variant.name == a.profile:
        profile_step(lambda: step(on_device[-1]), f"{case.name} {workload} {variant.name}")
    tokens = sum(sum(b["sample_lengths"]) for b in timed)
    samples = sum(b["num_samples"] for b in timed)
    flops = sum(model_flops(vlm, case, b["sample_lengths"]) for b in timed)
    peak = a.peak_tflops * 1e12
    optimizer = None  # free its state before the next variant (the closure `step` holds the cell)
    return Result(
        case=case.name, workload=workload, variant=variant.name, steps=len(timed), s_per_step=elapsed / len(timed),
        tokens_per_s=tokens / elapsed, samples_per_s=samples / elapsed, mfu=flops / elapsed / peak,
        peak_gib=torch.cuda.max_memory_allocated() / GiB if device.type == "cuda" else float("nan"),
        reserved_gib=torch.cuda.max_memory_reserved() / GiB if device.type == "cuda" else float("nan"),
        syncs_per_step=syncs, loss_first=float(first),
        settings=dataclasses.asdict(variant),
    )


def print_table(results: list[Result], peak_tflops: float) -> None:
    print(f"\nMFU against {peak_tflops:.0f} TFLOP/s bf16 dense (model FLOPs, see train/bench.py docstring)")
    header = f"{'case':<9}{'workload':<9}{'variant':<16}{'s/step':>8}{'tok/s':>10}{'samp/s':>8}{'MFU':>7}" \
             f"{'peak GiB':>10}{'syncs':>7}  note"
    print(header)
    print("-" * len(header))
    for r in results:
        if r.error:
            print(f"{r.case:<9}{r.workload:<9}{r.variant:<16}  FAILED: {r.error}")
            continue
        print(f"{r.case:<9}{r.workload:<9}{r.variant:<16}{r.s_per_step:>8.3f}{r.tokens_per_s:>10,.0f}"
              f"{r.samples_per_s:>8.2f}{100 * r.mfu:>6.1f}%{r.peak_gib:>10.1f}{r.syncs_per_step:>7d}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=["lora", "qlora"], choices=list(CASES))
    p.add_argument("--workloads", nargs="+", default=["mixed", "2048"], help="'mixed' (300-700 tokens) or a length")
    p.add_argument("--variants", nargs="+", default=["hf", "ours"])
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pack-len", type=int, default=8192, help="tokens per packed row (our path)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "flex_attention", "varlen"])
    p.add_argument("--loss-impl", default="liger", choices=["torch", "chunked", "liger", "auto"])
    p.add_argument("--ckpt-layers", type=int, default=None, help="decoder layers checkpointed (default all)")
    p.add_argument("--compile-vision", action="store_true")
    p.add_argument("--compile-llm", action="store_true")
    p.add_argument("--liger-kernels", action="store_true", help="liger RMSNorm/RoPE/SwiGLU in the decoder (ours)")
    p.add_argument("--profile", help="print a kernel profile of one step of this variant")
    p.add_argument("--full-layers", type=int, default=8, help="decoder depth of the full-SFT case on one GPU")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--preset", default="qwen_vl_7b", choices=["qwen_vl_7b", "tiny"], help="tiny: CPU smoke test")
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    variants = variants_from_args(a)
    results: list[Result] = []
    for case_name in a.cases:
        case = CASES[case_name]
        if case_name == "full":
            case = dataclasses.replace(case, llm_layers=a.full_layers)
        print(f"\n== {case.name}: {case.why}", flush=True)
        model, vlm = build_case_model(case, device, a.preset)
        for workload in a.workloads:
            for variant in variants:
                if case.qlora and variant.compile_llm:
                    variant = dataclasses.replace(variant, compile_llm=False)  # bnb 4-bit layers do not trace
                try:
                    r = run_variant(model, vlm, case, variant, workload, a, device)
                except Exception as e:  # a failing variant is reported, the others still run
                    r = Result(case.name, workload, variant.name, 0, *([math.nan] * 7), loss_first=math.nan,
                               error=f"{type(e).__name__}: {str(e)[:300]}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                results.append(r)
                print(f"  {workload:<7}{variant.name:<16}"
                      + (f"{r.tokens_per_s:>9,.0f} tok/s {r.peak_gib:6.1f} GiB loss {r.loss_first:.4f}"
                         if not r.error else f"FAILED {r.error}"), flush=True)
        del model, vlm
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(results, a.peak_tflops)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "args": vars(a),
                       "results": [dataclasses.asdict(r) for r in results]}, f, indent=2)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
