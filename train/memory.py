"""GPU memory of one training step, per GPU: arithmetic on parameter counts and a micro-batch's shape.

``estimate(counts, dims, setup, batch)`` is what ``python -m train.plan`` prints. Every term follows what
the trainer does (train/loop.py, train/parallel.py, train/perf.py, train/lora.py, models/) and is named
in the breakdown, so a figure can be traced to its cause. The result is comparable with
``torch.cuda.max_memory_allocated()`` (the trainer's ``peak_mem_gib``, train.bench's "peak GiB"): the CUDA
context and the allocator's slack are not in it (train/plan.py adds an allowance for them).

Storage of parameters (bytes per parameter)
- single process / DDP, bf16 autocast: trainable fp32 weight 4 + fp32 gradient 4 + AdamW exp_avg and
  exp_avg_sq 8 + the bf16 copy autocast caches for the whole step (forward and backward run inside one
  autocast region) 2. DDP adds its fp32 gradient buckets (4). Frozen: 2 with ``perf.frozen_bf16`` (the
  default: built or loaded in bf16), else 4. Q-LoRA decoder linears: NF4, 0.5 + quantisation constants
  (blocks of 64: one absmax each, itself 8-bit with an fp32 constant per 256 blocks under double quant).
- DeepSpeed (bf16): every weight bf16 (2). Trainable also: fp32 master 4 + AdamW 8 + the bf16 gradient
  partition 2, all divided by the GPU count; ZeRO-3 divides the bf16 weights too. ZeRO-2 keeps two
  gradient buckets of ``reduce_bucket_size`` during backward (``overlap_comm``), ZeRO-3 one.

Activations of one forward pass of T tokens (row padding included) and N images: a micro-batch, or with
``train.max_forward_tokens`` the largest of the passes it is cut into (whole rows each)
- decoder layer, kept for backward, per token: its two RMSNorms' inputs (fp32 upcasts in the Hugging Face
  kernel, the input itself in liger's), q, k, v and the output of flash/varlen attention (no L x L mask),
  the SwiGLU inputs (gate and up; HF also keeps silu(gate)), the inputs of linears whose weights train
  (q/k/v share one, o_proj reuses the attention output, gate/up share one, down_proj), and per LoRA
  adapter its dropout mask and the bf16 copy of its input. A checkpointed layer keeps only its input
  (the residual stream: fp32 when the embedding table is fp32, bf16 otherwise) and recomputes the rest
  in backward, one layer at a time. With ``perf.offload_activations`` what the layers keep waits in host
  memory but for two layers' worth (the one backward works on, the next one fetched). Frozen fp32 weights
  under autocast: each linear keeps the bf16 copy of its weight for backward (recomputed layers: one layer
  at a time). Padded rows (no packing), and SDPA on packed rows, add a boolean [L, L] mask per row.
- backward working set of one layer, per token: the gradients of the MLP's three [T, ffn] tensors and
  of the residual stream in and out.
- loss: ``torch`` materialises fp32 logits (the log-softmax output kept, 12 bytes per token x vocab at
  the start of backward); ``chunked`` does that for 2,048 tokens at a time; liger's fused linear
  cross-entropy computes the gradient in the forward, chunk by chunk (it keeps only the [T, d] input
  gradient, and the [V, d] head gradient when the head trains).
- vision: a frozen ViT runs under no_grad (nothing kept; one block's activations for all images at a
  time in its forward); a trained one, or one with LoRA adapters, keeps each block's input when
  checkpointed (fp32 residual under autocast). The resampler keeps its inputs and k/v projections when
  gradient reaches it, only its input when checkpointed.
- a Hugging Face family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): the same ViT terms per patch of each image's own
  grid, planned at the largest image data.max_pixels admits; its window attention (Qwen2.5-VL) changes the
  FLOPs, not what a block keeps (flash / SDPA keep no score matrix). Its patch mergers (2x2 patches into one
  LLM token; Qwen3-VL's DeepStack mergers too) run outside any checkpoint and keep their norm's fp32 input
  and their linears' bf16 inputs when gradient reaches them.
- DPO (train.stage: dpo): a micro-batch of pairs holds two sequences per pair and each pair's images once; the
  per-token log-probs take the chunked path; ``frozen_copy`` keeps a second copy of the model (partitioned
  under ZeRO-3), and its or the adapter-disabled reference pass runs under no_grad before the policy's.

Phases: the peak is the largest of the vision forward, the loss, the first decoder layer of backward
(all saved activations still live), the vision tower's backward, and the optimiser step (DeepSpeed's fp32
gradient copies; AdamW's foreach temporary where the fused kernel cannot run). ``startup`` is the build:
the trainer puts weights on the GPU in their final dtypes, plus one safetensors shard at a time when it
reads an export there; ZeRO-3 draws a preset's random weights whole on every GPU before partitioning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from train.flops import ForwardParts

GiB = 2**30
ZERO_MODES = ("zero2", "zero3")
CHUNKED_LOSS_TOKENS = 2048  # models.loss.CHUNK_TOKENS


@dataclass(frozen=True)
class Counts:
    """Parameters of the model as the trainer builds it (after freezing, LoRA; Q-LoRA's 4-bit layers)."""

    total: int
    trainable: int
    quantized: int = 0  # frozen decoder linears stored in 4 bit (Q-LoRA)
    lora: int = 0  # LoRA adapter parameters (part of trainable)
    largest_group: int = 0  # trainable parameters of the largest AdamW parameter group
    layer_linears: int = 0  # parameters of one decoder layer's linear layers

    @property
    def frozen(self) -> int:
        """Frozen parameters in a float dtype (everything frozen that is not 4-bit)."""
        return self.total - self.trainable - self.quantized


@dataclass(frozen=True)
class Dims:
    """The shape of the model: the Qwen-VL model at the recipe's image size, or a Hugging Face family's at its
    largest image (train.assemble's ``ModelFamily.plan_shape``)."""

    hidden: int
    kv_dim: int
    ffn: int
    layers: int
    heads: int
    vocab: int
    vit_width: int
    vit_mlp: int
    vit_layers: int
    patches: int  # vision tower patches per image (at the image size; a family's: its largest image)
    queries: int  # LLM tokens per image (resampler outputs; a family's merged patches)
    # Patch mergers (a Hugging Face family's merger, and Qwen3-VL's DeepStack mergers): a norm and two
    # linears over 2x2 merged patches, outside any checkpoint. 0: the Qwen-VL resampler, which is
    # checkpointed with the vision tower (perf.checkpoint_vision).
    mergers: int = 0


def decoder_dims(text_config: dict) -> dict[str, int]:
    """The decoder's fields of ``Dims`` from a Hugging Face text config: key/value width from the key/value
    heads (grouped-query attention), head_dim where the config sets it (Qwen3)."""
    tc = text_config
    heads = int(tc["num_attention_heads"])
    head_dim = int(tc.get("head_dim") or tc["hidden_size"] // heads)
    return dict(
        hidden=int(tc["hidden_size"]),
        kv_dim=head_dim * int(tc.get("num_key_value_heads") or heads),
        ffn=int(tc["intermediate_size"]),
        layers=int(tc["num_hidden_layers"]),
        heads=heads,
        vocab=int(tc["vocab_size"]),
    )


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model beyond its parameter counts; each model family gives its own
    (train.assemble's ``ModelFamily.plan_shape``)."""

    dims: Dims
    flops: ForwardParts
    image: str  # one image as the plan names it ("448 px"; a family's largest, from data.max_pixels)
    vision_blocks: str  # qualified name of the vision tower's block list (where vision LoRA adapters sit)
    liger_kernels: bool  # whether perf.liger_kernels "auto" turns liger's decoder kernels on (on CUDA)


@dataclass(frozen=True)
class Setup:
    """How the recipe trains (train.recipe sections resolved for a GPU run)."""

    mode: str  # single | ddp | zero2 | zero3
    gpus: int = 1
    bf16: bool = True
    frozen_bf16: bool = False
    vision_trains: bool = False
    resampler_trains: bool = True
    llm_trains: bool = True  # the decoder's own weights
    head_trains: bool = True  # input embeddings + LM head
    lora_inputs: tuple[int, ...] = ()  # in_features of each LoRA-adapted linear of one decoder layer
    vision_lora_inputs: tuple[int, ...] = ()  # the same for one vision block (lora.vision_targets)
    lora_r: int = 0
    lora_dropout: float = 0.0
    quantized: bool = False
    double_quant: bool = True
    grad_checkpointing: bool = True
    checkpointed_layers: int = 0  # decoder layers recomputed in backward
    liger_kernels: bool = False
    loss_impl: str = "liger"  # torch | chunked | liger ("auto" resolved by the caller)
    attention: str = "varlen"
    grad_accum: int = 1
    fused_adamw: bool = True  # train.optim: the fused kernel when every trainable weight is on the GPU
    load_shard_bytes: float = 0.0  # an export read onto the GPU: the largest safetensors shard, held once
    zero3_built_whole: bool = False  # ZeRO-3 from a preset: drawn whole in bf16 on each GPU, then partitioned
    zero: dict = field(default_factory=dict)  # DeepSpeed zero_optimization settings
    # DPO (train.stage: dpo): where the reference log-probs come from
    # (train.dpo.reference_mode), or "" (not DPO)
    reference: str = ""
    offload_activations: bool = (
        False  # perf.offload_activations: the decoder's saved activations wait on the host
    )
    vision_checkpointing: bool = (
        True  # perf.checkpoint_vision: with grad_checkpointing, the ViT and resampler too
    )

    @property
    def deepspeed(self) -> bool:
        return self.mode in ZERO_MODES


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch on one GPU: ``rows`` rows padded to ``row_len`` tokens, ``images`` images, run as
    forward passes of ``rows_per_pass`` rows (train.max_forward_tokens; all rows at once by default)."""

    samples: int
    rows: int
    row_len: int
    images: float
    real_tokens: float  # sample tokens, row padding excluded (what tokens/s counts)
    packed: bool = True  # several samples per row (no attention mask) or one padded sample per row
    rows_per_pass: int | None = None

    @property
    def tokens(self) -> int:
        return self.rows * self.row_len

    @property
    def passes(self) -> int:
        return math.ceil(self.rows / self.pass_rows)

    @property
    def pass_rows(self) -> int:
        return min(self.rows, self.rows_per_pass or self.rows)

    @property
    def pass_tokens(self) -> int:
        """Tokens of the largest forward pass: what activations scale with."""
        return self.pass_rows * self.row_len

    @property
    def pass_images(self) -> float:
        return self.images * self.pass_rows / self.rows


@dataclass
class Estimate:
    """Bytes per GPU. ``terms`` break the static memory and activations down; ``phases`` hold the
    allocated bytes at each candidate peak."""

    terms: dict[str, float]
    phases: dict[str, float]
    startup: float  # while the model is built or loaded, before the first step

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def peak(self) -> float:
        """Allocated bytes at the training step's peak (comparable to a steady-state max_memory_allocated)."""
        return self.phases[self.peak_phase]

    @property
    def process_peak(self) -> float:
        """The largest allocation since the process started (what the trainer's peak_mem_gib logs)."""
        return max(self.peak, self.startup)


# ---------------------------------------------------------------------------------------------- sizes
def nf4_bytes_per_param(double_quant: bool) -> float:
    """bitsandbytes 4-bit: two weights per byte plus one absmax per block of 64 (fp32, or 8-bit with an
    fp32 constant per 256 blocks under double quantisation)."""
    return 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)


def residual_bytes(s: Setup) -> int:
    """Bytes per element of the decoder's residual stream. It takes the embedding table's dtype: bf16 under
    DeepSpeed, and outside it fp32 unless frozen_bf16 cast a frozen table (autocast does not touch adds)."""
    if not s.bf16:
        return 4
    if s.deepspeed:
        return 2
    return 2 if s.frozen_bf16 and not s.head_trains else 4


def frozen_weights_fp32_under_autocast(s: Setup) -> bool:
    """Frozen float weights kept in fp32 and cast to bf16 at each use (their copies are not cached)."""
    return s.bf16 and not s.deepspeed and not s.frozen_bf16


def head_fp32_under_autocast(s: Setup) -> bool:
    """An fp32 LM head that the fused losses cast to bf16 once per forward (a [V, d] copy)."""
    return s.bf16 and not s.deepspeed and (s.head_trains or not s.frozen_bf16)


# ------------------------------------------------------------------------------------------ parameters
def parameter_terms(c: Counts, s: Setup) -> dict[str, float]:
    """Weights, gradients and optimiser states per GPU (bytes)."""
    t, w = c.trainable, s.gpus
    terms: dict[str, float] = {"weights: 4-bit": c.quantized * nf4_bytes_per_param(s.double_quant)}
    if s.deepspeed:
        weight = 2 if s.bf16 else 4
        shard = w if s.mode == "zero3" else 1  # ZeRO-3 partitions every parameter, frozen ones included
        terms["weights: frozen"] = c.frozen * weight / shard
        terms["weights: trainable"] = t * weight / shard
        terms["gradients: partition"] = t * weight / w
        terms["optimizer: fp32 master"] = t * 4 / w if s.bf16 else 0.0
        terms["optimizer: AdamW states"] = t * 8 / w
    else:
        terms["weights: frozen"] = c.frozen * (2 if s.frozen_bf16 else 4)
        terms["weights: trainable"] = t * 4
        terms["weights: autocast bf16 copies"] = t * 2 if s.bf16 else 0.0
        terms["gradients: fp32"] = t * 4
        if s.mode == "ddp":
            terms["gradients: DDP buckets"] = t * 4
        terms["optimizer: AdamW states"] = t * 8
    if s.reference == "frozen_copy":  # train.dpo.copy_for_reference: a deep copy of the built model
        if s.deepspeed:  # its own ZeRO-3 engine partitions it; under ZeRO-2 it is a plain bf16 module
            terms["weights: DPO reference copy"] = c.total * 2 / (w if s.mode == "zero3" else 1)
        else:  # the policy's storage dtypes: frozen bf16 (frozen_bf16), trainable modules fp32
            terms["weights: DPO reference copy"] = (
                c.frozen * (2 if s.frozen_bf16 else 4)
                + t * 4
                + c.quantized * nf4_bytes_per_param(s.double_quant)
            )
    return terms


def reduce_buckets(s: Setup) -> float:
    """DeepSpeed's gradient reduction buffers, live during backward."""
    if not s.deepspeed or not s.zero.get("contiguous_gradients", True):
        return 0.0
    size = float(s.zero.get("reduce_bucket_size", 5e8)) * (2 if s.bf16 else 4)
    return size * (2 if s.mode == "zero2" and s.zero.get("overlap_comm", False) else 1)


def zero3_gathered(c: Counts, d: Dims, s: Setup) -> float:
    """ZeRO-3 parameters gathered while computing: the LM head (registered as an external parameter of the
    wrapper, so gathered for the whole forward and backward), one decoder layer and the prefetch bucket."""
    if s.mode != "zero3":
        return 0.0
    prefetch = float(s.zero.get("stage3_prefetch_bucket_size", 5e7))
    return 2 * (d.vocab * d.hidden + c.layer_linears + prefetch)


def optimizer_step_transient(c: Counts, s: Setup) -> float:
    """Extra bytes while the optimiser steps. torch's fused AdamW has no large temporary; its foreach form
    (weights not on the GPU when the optimiser is built) keeps one fp32 tensor of a group
    (sqrt of exp_avg_sq).
    - ZeRO-2: per group, the bf16 gradient partition flattened and cast to an fp32 gradient (2 + 4 bytes;
      the gradient partition is freed before the last group steps, which covers a foreach temporary).
    - ZeRO-3: the same per sub-group of at most zero_optimization.sub_group_size elements."""
    foreach = 0 if s.fused_adamw else 4
    if s.mode == "zero2":
        return 6 * c.largest_group / s.gpus
    if s.mode == "zero3":
        sub_group = min(float(s.zero.get("sub_group_size", 1e9)), c.largest_group / s.gpus)
        return max(6, 4 + foreach) * sub_group
    return foreach * c.largest_group


# ------------------------------------------------------------------------------------------ activations
def decoder_per_token(d: Dims, s: Setup) -> tuple[float, float, float]:
    """Bytes per token of one decoder layer: (kept by a checkpointed layer, kept by a layer that is not
    checkpointed (= what a checkpointed one recomputes), backward working set)."""
    act = 2 if s.bf16 else 4
    res = residual_bytes(s)
    h, kv, f = d.hidden, d.kv_dim, d.ffn
    norms = 2 * (res * h if s.liger_kernels else 4 * h)  # HF RMSNorm keeps its fp32 upcast
    if s.llm_trains and not s.liger_kernels:
        norms += 2 * res * h  # and the normalised input of a trainable scale
    attention = act * (2 * h + 2 * kv) + 4 * d.heads  # q, k, v, output, log-sum-exp (flash / varlen)
    mlp = (2 if s.liger_kernels else 3) * act * f  # gate, up (HF: and silu(gate))
    linear_inputs = act * (2 * h + f) if s.llm_trains else 0  # q/k/v input, gate/up input, down input
    dropout_mask = 1 if s.lora_dropout > 0 else 0
    lora = sum((act + dropout_mask) * n + act * s.lora_r for n in s.lora_inputs)
    kept = norms + attention + mlp + linear_inputs + lora
    work = 3 * act * f + 2 * res * h
    return res * h, kept, work


def decoder_terms(c: Counts, d: Dims, s: Setup, b: MicroBatch) -> tuple[float, float]:
    """(bytes kept by the decoder at the start of backward, working set of the first layer's backward)."""
    ckpt, kept, work = decoder_per_token(d, s)
    checkpointed = s.checkpointed_layers if s.grad_checkpointing else 0
    plain = d.layers - checkpointed
    # Frozen fp32 linears under autocast keep the bf16 copy of their weight for the input gradient.
    copies = (
        2 * c.layer_linears
        if frozen_weights_fp32_under_autocast(s) and not s.llm_trains and not s.quantized
        else 0
    )
    tokens = b.pass_tokens
    if s.offload_activations:  # train.offload: on the GPU, the layer backward is working on and the next one
        live = tokens * min(2, d.layers) * (ckpt if checkpointed else kept) + plain * copies
    else:
        live = tokens * (checkpointed * ckpt + plain * kept) + plain * copies
    if s.attention == "sdpa" or (s.attention == "varlen" and not b.packed):
        live += (
            b.pass_rows * b.row_len**2
        )  # a boolean [L, L] mask per row: SDPA's (varlen falls back to it on padding)
    recompute = (tokens * kept + copies) if checkpointed else 0
    return live, recompute + tokens * work


def loss_terms(d: Dims, s: Setup, b: MicroBatch) -> tuple[float, float, float]:
    """(kept from the loss's forward to its backward, extra bytes at its backward, extra at its forward)."""
    act, T, V, h = (2 if s.bf16 else 4), b.pass_tokens, d.vocab, d.hidden
    head_copy = 2 * V * h if head_fp32_under_autocast(s) else 0
    if s.loss_impl == "liger":
        chunk = 2 ** math.ceil(math.log2(max(1, math.ceil(T / math.ceil(V / h)))))
        kept = act * h * T + (act * V * h if s.head_trains else 0)  # input gradient; head gradient
        return kept, 0.0, head_copy + chunk * V * (act + 4)
    if s.loss_impl == "chunked":
        chunk = min(T, CHUNKED_LOSS_TOKENS)
        return 0.0, 12 * chunk * V + head_copy, 10 * chunk * V + head_copy
    # torch: fp32 logits; log_softmax keeps its output; backward holds two more [T, V] fp32 gradients
    return 4 * T * V + head_copy, 8 * T * V, 6 * T * V


def vision_terms(d: Dims, s: Setup, b: MicroBatch) -> tuple[float, float, float]:
    """(kept for backward, working set of the vision backward, forward transient of a frozen tower)."""
    act = 2 if s.bf16 else 4
    n, p, w, m = b.pass_images, d.patches, d.vit_width, d.vit_mlp
    kept = work = forward = 0.0
    dropout_mask = 1 if s.lora_dropout > 0 else 0
    if s.vision_trains or s.vision_lora_inputs:  # gradient runs through the tower: it keeps activations
        stream = act if s.deepspeed or not s.bf16 else 4  # fp32 under autocast: LayerNorm outputs fp32
        # q, k, v and output of attention, the GELU input, the mid-block residual (its LayerNorm's input);
        # trained linears keep their inputs (qkv, proj, fc1: width; fc2: mlp), LoRA adapters theirs
        block = act * (4 * w + m) + stream * w
        block += act * (3 * w + m) if s.vision_trains else 0
        block += sum((act + dropout_mask) * n + act * s.lora_r for n in s.vision_lora_inputs)
        if s.grad_checkpointing and s.vision_checkpointing:
            kept = n * p * d.vit_layers * stream * w
            work = n * p * (block + 3 * act * m)
        else:
            kept = n * p * d.vit_layers * block
            work = n * p * 3 * act * m
    else:
        forward = n * p * (10 * w + 4 * m)  # under no_grad: one block of every image at a time
    if d.mergers and (s.vision_trains or s.vision_lora_inputs or s.resampler_trains):
        # each merger keeps its norm's fp32 input, and the bf16 inputs of its two linears and of the GELU
        # between them ([patches / 4, 4 x width] each), whatever the checkpoint settings
        kept += d.mergers * n * p * (4 * w + 3 * act * w)
    elif s.vision_trains or s.vision_lora_inputs or s.resampler_trains:
        # kv_proj's input, its output, LayerNorm's fp32 input and output, their bf16 casts, the k and v
        # projections: 1.45 GiB for 18 images measured at the Qwen-VL shape
        # (docs/benchmarks.md, memory at the peak)
        resampler = n * p * (act * w + 20 * d.hidden)
        if s.grad_checkpointing and s.vision_checkpointing:  # VLM.set_gradient_checkpointing: input kept
            kept += n * p * act * w
            work = max(work, resampler)  # its recompute, at the end of backward
        else:
            kept += resampler
    kept += n * d.queries * d.hidden * act  # resampler / merger outputs spliced into the embeddings
    return kept, work, forward


def reference_forward(d: Dims, s: Setup, b: MicroBatch) -> float:
    """DPO's reference pass under no_grad: the hidden states plus the largest of the vision tower's block,
    one decoder layer's working set, and one chunk of per-token log-probs (fp32 logits of 2,048 tokens)."""
    _, kept, work = decoder_per_token(d, s)
    T = b.pass_tokens
    logits = 10 * min(T, CHUNKED_LOSS_TOKENS) * d.vocab
    vision = b.pass_images * d.patches * (10 * d.vit_width + 4 * d.vit_mlp)
    return T * residual_bytes(s) * d.hidden + max(vision, T * (kept + work), logits)


# --------------------------------------------------------------------------------------------- phases
def estimate(c: Counts, d: Dims, s: Setup, b: MicroBatch) -> Estimate:
    terms = parameter_terms(c, s)
    static = sum(terms.values())
    # Gradients exist during backward from its start when DeepSpeed owns them or forward passes accumulate;
    # otherwise (set_to_none after each step) they appear layer by layer as the activations go.
    accumulating = s.grad_accum > 1 or b.passes > 1
    base = static - (0 if s.deepspeed or accumulating else terms["gradients: fp32"])
    buckets, gathered = reduce_buckets(s), zero3_gathered(c, d, s)

    vision_kept, vision_work, vision_forward = vision_terms(d, s, b)
    decoder_kept, decoder_work = decoder_terms(c, d, s, b)
    loss_kept, loss_backward, loss_forward = loss_terms(d, s, b)
    terms["activations: vision + resampler"] = vision_kept
    terms["activations: decoder"] = decoder_kept
    terms["activations: loss"] = loss_kept
    kept = vision_kept + decoder_kept + loss_kept

    phases = {
        "vision forward": base + gathered + vision_forward,
        "loss forward": base + gathered + vision_kept + decoder_kept + loss_forward,
        "backward: loss": base + gathered + buckets + kept + loss_backward,
        "backward: first decoder layer": base + gathered + buckets + kept + decoder_work,
    }
    if s.vision_trains or s.vision_lora_inputs:  # last in backward: every other gradient exists by then
        phases["backward: vision tower"] = static + gathered + buckets + vision_kept + vision_work
    phases["optimizer step"] = static + optimizer_step_transient(c, s)
    if s.reference in ("frozen_copy", "adapter_disabled"):  # before the policy's forward, under no_grad
        phases["DPO reference forward"] = base + gathered + reference_forward(d, s, b)

    at_rest = sum(v for k, v in terms.items() if k.startswith("weights") and "autocast" not in k)
    startup = c.total * 2 if s.zero3_built_whole else at_rest + s.load_shard_bytes
    return Estimate(terms=terms, phases=phases, startup=startup)
