"""Model FLOPs of a training step, for MFU: one convention for the training loop and train.bench.

Matmul FLOPs of the model, 2 per multiply-add. Decoder, per token: 2N forward, +4N backward when its
weights train, +2N when they are frozen but gradient flows through them (input gradients only); N = its
linear layers + LM head (embedding lookups are not matmuls). LoRA adapters: 6 per adapter parameter per
token (vision tower adapters: per patch). Causal attention: 2*s^2*d per layer per sample forward, x3 with
backward. Per image: the vision tower forward only unless it trains (x3) or carries LoRA adapters (x2: input
gradients through its frozen weights), the resampler x3 when gradient reaches it (it or the ViT trains). A
frozen reference model's forward (DPO) is model work too: ``forward_flops``. Recomputation by activation
checkpointing and Q-LoRA dequantisation are not counted: they are overhead, not model FLOPs.

The plain "6 x all parameters x tokens" estimate overstates a VLM step by ~10% at the Qwen-VL shape: a
frozen 1.84B ViT runs forward only, and per image (1,024 patches), not per text token.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.config import VLMConfig


@dataclass(frozen=True)
class StepFlops:
    """FLOP rates of one model under one freezing plan; ``__call__`` gives a step's FLOPs."""

    per_token: float  # decoder linears + LM head + LoRA adapters, forward and backward
    per_attention_pair: float  # times s^2 per sample of s tokens
    per_image: float  # vision tower + resampler

    def __call__(self, tokens: float, images: float, sum_sq_lengths: float) -> float:
        return self.per_token * tokens + self.per_attention_pair * sum_sq_lengths + self.per_image * images

    def __add__(self, other: StepFlops) -> StepFlops:
        return StepFlops(
            self.per_token + other.per_token,
            self.per_attention_pair + other.per_attention_pair,
            self.per_image + other.per_image,
        )


@dataclass(frozen=True)
class ForwardParts:
    """The forward FLOPs of a model, by part: what a model family gives the planner (train.assemble's
    ``ModelFamily.plan_shape``; ``qwen_vl_forward_parts`` for the Qwen-VL model)."""

    llm: int  # decoder linear + LM head parameters (2 FLOPs each per token)
    head: int  # LM head parameters (hidden x vocab)
    layers: int  # decoder layers
    down_projection: int  # one decoder layer's down projection parameters (hidden x ffn)
    attention_pair: int  # causal attention forward FLOPs per s^2 of a sample, all layers
    patches: int  # vision tower patches per image
    projector: int  # forward FLOPs per image of what projects it into the LLM (resampler, mergers)
    vision: int  # forward FLOPs per image of the vision tower


def step_flops(
    model: VLMConfig | ForwardParts,
    *,
    vision_trains: bool,
    resampler_trains: bool,
    llm_trains: bool,
    lora_params: int = 0,
    vision_lora_params: int = 0,
) -> StepFlops:
    """The FLOP rates of ``model`` (a Qwen-VL config at ``config.vision.image_size``, or any family's
    parts) for what trains. ``lora_params``: adapter parameters in the LLM; ``vision_lora_params``: in the
    vision tower."""
    parts = _parts(model)
    per_token = (6 if llm_trains else 4) * parts.llm + 6 * lora_params
    vit_factor = 3 if vision_trains else 2 if vision_lora_params else 1
    per_image = (
        (3 if resampler_trains or vision_trains or vision_lora_params else 1) * parts.projector
        + vit_factor * parts.vision
        + 6 * vision_lora_params * parts.patches
    )
    return StepFlops(
        per_token=float(per_token),
        per_attention_pair=float(3 * parts.attention_pair),
        per_image=float(per_image),
    )


def forward_flops(model: VLMConfig | ForwardParts, vision: bool = True) -> StepFlops:
    """A forward pass only (DPO's frozen reference model); ``vision=False``: its images' vision tower
    encodings come from the policy's (models.vlm.frozen_vision_shared), only its resampler runs."""
    parts = _parts(model)
    return StepFlops(
        per_token=float(2 * parts.llm),
        per_attention_pair=float(parts.attention_pair),
        per_image=float(parts.projector + (parts.vision if vision else 0)),
    )


def _parts(model: VLMConfig | ForwardParts) -> ForwardParts:
    return model if isinstance(model, ForwardParts) else qwen_vl_forward_parts(model)


def forward_parts(text_config: dict, patches: int, projector: int, vision: int) -> ForwardParts:
    """A model's parts: the decoder's from its Hugging Face text config, the vision side's per image (of
    ``patches`` patches) as the model family counts them."""
    d = text_config["hidden_size"]
    n_llm, attention_fwd = _decoder_parts(text_config)
    return ForwardParts(
        llm=n_llm,
        head=d * text_config["vocab_size"],
        layers=text_config["num_hidden_layers"],
        down_projection=d * text_config["intermediate_size"],
        attention_pair=attention_fwd,
        patches=patches,
        projector=projector,
        vision=vision,
    )


def qwen_vl_forward_parts(config: VLMConfig) -> ForwardParts:
    """The Qwen-VL model's parts: its ViT over every patch of a square image, then the resampler's
    cross-attention of ``num_image_tokens`` queries."""
    vc, d = config.vision, config.text_config["hidden_size"]
    patches = (vc.image_size // vc.patch_size) ** 2
    q = config.num_image_tokens
    resampler_fwd = (
        2 * (patches * vc.width * d + q * d * d + 2 * patches * d * d + 2 * q * d * d) + 4 * q * patches * d
    )
    vit_fwd = vit_forward_flops(
        patches, vc.width, vc.mlp_dim, 2, 3 * vc.patch_size**2, attended=[patches] * vc.layers
    )
    return forward_parts(config.text_config, patches, resampler_fwd, vit_fwd)


def vit_forward_flops(
    patches: int, width: int, mlp: int, mlp_matrices: int, patch_inputs: int, attended: list[int]
) -> int:
    """Forward FLOPs of a ViT over one image of ``patches`` patches: per block its q, k, v and output
    projections (4 w^2 per patch), ``mlp_matrices`` w x mlp products (2 for a GELU MLP, 3 for SwiGLU) and
    attention over ``attended[i]`` patches in block i (every patch of the image, or of its window); the patch
    embedding over ``patch_inputs`` values per patch."""
    blocks = sum(
        2 * patches * (4 * width**2 + mlp_matrices * width * mlp) + 4 * patches * span * width
        for span in attended
    )
    return blocks + 2 * patches * patch_inputs * width


def _decoder_parts(tc: dict) -> tuple[int, int]:
    """(decoder linear + LM head parameters, attention forward FLOPs per s^2) of an HF text config."""
    d, layers, ffn, vocab = (
        tc["hidden_size"],
        tc["num_hidden_layers"],
        tc["intermediate_size"],
        tc["vocab_size"],
    )
    # q and o are heads x head_dim wide (Qwen3's head_dim need not be d / heads), k and v kv_heads x head_dim
    head_dim = tc.get("head_dim") or d // tc["num_attention_heads"]
    q_dim, kv_dim = tc["num_attention_heads"] * head_dim, tc["num_key_value_heads"] * head_dim
    n_layer = d * (2 * q_dim + 2 * kv_dim) + 3 * d * ffn  # q, o + k, v + gate, up, down
    return layers * n_layer + d * vocab, 2 * q_dim * layers


def llm_step_flops(text_config: dict, *, llm_trains: bool, lora_params: int = 0) -> StepFlops:
    """The decoder's share of a step's FLOPs (a Hugging Face family's: its ViT runs per patch of each image's
    own grid, which the step's counts do not carry yet, so images are not counted and MFU reads low)."""
    n_llm, attention_fwd = _decoder_parts(text_config)
    return StepFlops(
        per_token=float((6 if llm_trains else 4) * n_llm + 6 * lora_params),
        per_attention_pair=float(3 * attention_fwd),
        per_image=0.0,
    )


def llm_forward_flops(text_config: dict) -> StepFlops:
    """A forward pass of a Hugging Face family's decoder only (DPO's adapter-off reference; its images are
    not counted, as in ``llm_step_flops``)."""
    n_llm, attention_fwd = _decoder_parts(text_config)
    return StepFlops(per_token=float(2 * n_llm), per_attention_pair=float(attention_fwd), per_image=0.0)


@dataclass(frozen=True)
class RecomputeFlops:
    """What activation checkpointing recomputes in backward (train.budget's cost model): the forward of one
    decoder layer per token (its linears, 2 per weight), of which the down projection (models.decoder_layers
    runs it outside the checkpoint where it keeps nothing), causal attention per s^2 of a sample per layer,
    and per image the resampler's forward and the vision tower's (when gradient runs through it)."""

    layer_per_token: float
    down_projection_per_token: float
    attention_per_layer_pair: float
    resampler_per_image: float
    vision_per_image: float


def recompute_flops(model: VLMConfig | ForwardParts) -> RecomputeFlops:
    parts = _parts(model)
    return RecomputeFlops(
        layer_per_token=2 * (parts.llm - parts.head) / parts.layers,
        down_projection_per_token=2 * parts.down_projection,
        attention_per_layer_pair=parts.attention_pair / parts.layers,
        resampler_per_image=parts.projector,
        vision_per_image=parts.vision,
    )
