"""One small interface over a single process, plain DDP, and DeepSpeed ZeRO-2 / ZeRO-3.

The loop only ever calls:
    with engine.micro_step(last):  out = engine.forward(batch); engine.backward(loss)
    grad_norm, applied = engine.step()
so the same loop serves every mode. Each mode's quirks are handled here:
  * DDP averages gradients over ranks and must skip the all-reduce on non-final micro-batches
    (``no_sync`` around forward *and* backward).
  * DeepSpeed owns clipping, the optimiser step and its own gradient accumulation counter; its
    backward would divide the loss by gradient_accumulation_steps, which we turn off
    (``scale_wrt_gas=False``) because the loop already normalises by the step's token count.
  * Our torch optimiser and LambdaLR are handed to ``deepspeed.initialize`` so the recipe's schedule
    is the one that runs (the reference's DS JSON replaced it by WarmupLR, QwenLM/Qwen-VL#183).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from models.errors import UserError
from train.offload import ActivationOffload
from train.recipe import ParallelSection, TrainSection

DS_CONFIG_DIR = Path(__file__).parent / "ds_configs"


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_mode(cfg: ParallelSection, world_size: int) -> str:
    """ "single", "ddp", "zero2" or "zero3"."""
    if cfg.mode == "auto" or (cfg.mode == "ddp" and world_size == 1):
        return "ddp" if world_size > 1 else "single"  # DDP over one process would need a process group
    return cfg.mode


def init_distributed(cfg: ParallelSection) -> DistInfo:
    """Join the process group started by torchrun / the deepspeed launcher (env:// rendezvous), or run
    as a single process when neither set RANK/WORLD_SIZE."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mode = resolve_mode(cfg, world_size)
    if mode.startswith("zero") and not cuda:
        # DeepSpeed picks its accelerator at import time; on a CPU-only machine it must be the CPU one.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if world_size > 1 or mode.startswith("zero"):
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
        if mode.startswith("zero"):
            import deepspeed  # optional heavy dependency: only ZeRO runs import it

            deepspeed.init_distributed(dist_backend=backend)
        elif not dist.is_initialized():
            dist.init_process_group(backend=backend, device_id=device if cuda else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def deepspeed_config(
    parallel: ParallelSection, train: TrainSection, clip_grad: float, mode: str, world_size: int
) -> dict[str, Any]:
    """The shipped train/ds_configs/<mode>.json (or the user's JSON), with the batch, clipping and
    precision entries filled in from the recipe's train section and ``optim.clip_grad`` ("auto" or absent ->
    recipe value; a different explicit value is an error, so the JSON and the recipe cannot silently
    disagree)."""
    path = Path(parallel.deepspeed_config or DS_CONFIG_DIR / f"{mode}.json")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read the DeepSpeed config: {e}") from e
    for owned in ("optimizer", "scheduler"):
        if owned in config:
            raise UserError(
                f"{path}: remove '{owned}'; the optimiser and lr schedule come from the recipe's optim / "
                "schedule sections (a DeepSpeed scheduler would silently replace the cosine, Qwen-VL#183)"
            )
    wanted = {
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch * train.grad_accum * world_size,
        "gradient_clipping": clip_grad,
    }
    for key, value in wanted.items():
        if config.get(key, "auto") not in ("auto", value):
            raise UserError(
                f"{path}: '{key}' is {config[key]} but the recipe implies {value}; set it to \"auto\""
            )
        config[key] = value
    bf16 = config.setdefault("bf16", {})
    if bf16.get("enabled", "auto") not in ("auto", train.bf16):
        raise UserError(f"{path}: 'bf16.enabled' disagrees with train.bf16={train.bf16}")
    bf16["enabled"] = train.bf16
    zero = config.setdefault("zero_optimization", {})
    expected_stage = int(mode[-1])
    if zero.get("stage", expected_stage) != expected_stage:
        raise UserError(f"{path}: zero_optimization.stage is {zero['stage']} but parallel.mode is {mode}")
    zero["stage"] = expected_stage
    if expected_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # export gathers full weights
    config.setdefault("steps_per_print", 10**9)  # our loop logs
    return config


@dataclass
class StepOutput:
    loss_sum: torch.Tensor
    num_tokens: torch.Tensor
    token_logps: torch.Tensor | None = None  # [B, L], when asked for (preference training)


class LossOutputs(nn.Module):
    """ZeRO-3 re-gathers a module's parameters for backward through hooks on its output tensors, and
    cannot see tensors inside a VLMOutput dataclass; this wrapper returns a plain tuple instead.
    Its state-dict keys gain a ``model.`` prefix (stripped again in train.checkpoint)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **batch) -> tuple[torch.Tensor, ...]:
        out = self.model(**batch)
        if out.token_logps is None:
            return out.loss_sum, out.num_tokens
        return out.loss_sum, out.num_tokens, out.token_logps


class Engine:
    """Forward / backward / optimiser step of ``model`` in one of the four modes.

    It reads the recipe's parallel and train sections, ``optim.clip_grad`` and ``perf.offload_activations``
    (as resolved for this device: train.perf)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        dist_info: DistInfo,
        parallel: ParallelSection,
        train: TrainSection,
        clip_grad: float,
        offload_activations: bool = False,
    ):
        self.mode = resolve_mode(parallel, dist_info.world_size)
        self.dist = dist_info
        self.model = model  # the unwrapped model (state dicts, export)
        self.clip_grad = clip_grad
        self.autocast_bf16 = train.bf16 and not self.mode.startswith("zero")  # DS casts itself
        # The DeepSpeed config of a ZeRO run (None otherwise): a frozen reference model is sharded alike.
        self.deepspeed_config: dict[str, Any] | None = None
        if self.mode.startswith("zero"):
            import deepspeed  # optional heavy dependency: only ZeRO runs import it

            config = self.deepspeed_config = deepspeed_config(
                parallel, train, clip_grad, self.mode, dist_info.world_size
            )
            wrapped = LossOutputs(model) if self.mode == "zero3" else model
            # A callable gives the engine our LambdaLR bound to the torch optimiser it wraps.
            self.module, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=wrapped, optimizer=optimizer, lr_scheduler=lambda _opt: scheduler, config=config
            )
            if self.mode == "zero3":
                # VLM.forward reads lm_head.weight directly (fused loss) instead of calling lm_head, so
                # ZeRO-3 must gather it for the wrapper's forward and backward.
                head = model.llm.get_output_embeddings()
                deepspeed.zero.register_external_parameter(wrapped, head.weight)
        else:
            model.to(dist_info.device)
            self.module = model
            if self.mode == "ddp":
                device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
                self.module = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
            self.optimizer, self.scheduler = optimizer, scheduler
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        # perf.offload_activations: what the forward saves for backward waits in pinned host memory
        # (train.offload)
        self.offload = None
        if offload_activations and dist_info.device.type == "cuda":
            self.offload = ActivationOffload()

    @property
    def uses_deepspeed(self) -> bool:
        return self.mode.startswith("zero")

    @contextlib.contextmanager
    def micro_step(self, last: bool):
        """Wrap forward + backward of one micro-batch. DDP skips the gradient all-reduce on all but the
        last micro-batch of an optimiser step."""
        ctx = self.module.no_sync() if self.mode == "ddp" and not last else contextlib.nullcontext()
        if self.uses_deepspeed:
            # A step may hold more forwards than grad_accum (train.max_forward_tokens splits micro-batches):
            # say where the boundary is rather than let DeepSpeed count micro-steps.
            self.module.set_gradient_accumulation_boundary(last)
        with ctx, self.autocast():
            yield

    def autocast(self):
        """bf16 autocast where the mode computes in bf16 over fp32 weights (DeepSpeed casts itself)."""
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16)

    def forward(self, batch: dict[str, Any], token_logps: bool = False):
        """The model's output; only ``loss_sum`` and ``num_tokens`` are guaranteed (and ``token_logps``
        when asked for)."""
        extra = {"return_token_logps": True} if token_logps else {}
        if batch.get("image_grid_thw") is not None:  # a Hugging Face family's images: one grid per image
            extra["image_grid_thw"] = batch["image_grid_thw"]
        with self.offload.saved_on_host() if self.offload else contextlib.nullcontext():
            return self.module(
                input_ids=batch["input_ids"],
                pixel_values=batch.get("pixel_values"),
                attention_mask=batch.get("attention_mask"),
                position_ids=batch.get("position_ids"),
                labels=batch["labels"],
                cu_seq_lens=batch.get("cu_seq_lens"),
                max_length=batch.get("max_length"),
                label_positions=batch.get("label_positions"),
                image_index=batch.get("image_index"),
                **extra,
            )

    def forward_loss(self, batch: dict[str, Any], token_logps: bool = False) -> StepOutput:
        out = self.forward(batch, token_logps)
        if isinstance(out, tuple):
            return StepOutput(*out)
        return StepOutput(out.loss_sum, out.num_tokens, out.token_logps)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        if self.uses_deepspeed:
            self.module.backward(loss, scale_wrt_gas=False)
            if not last:
                self.module.step()  # not a boundary: DeepSpeed only advances its micro-step counter
        else:
            loss.backward()

    def step(self) -> tuple[torch.Tensor | float, bool]:
        """Clip, step the optimiser and the schedule. Returns (grad norm before clipping, applied);
        a step with a non-finite gradient norm is skipped (not applied, schedule not advanced)."""
        if self.uses_deepspeed:
            skipped_before = self.module.skipped_steps
            self.module.step()  # boundary: clip, optimiser step (skipped on inf/nan), scheduler step
            norm = self.module.get_global_grad_norm()
            applied = self.module.skipped_steps == skipped_before
            return (norm if norm is not None else float("nan")), applied
        max_norm = self.clip_grad if self.clip_grad > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        # One host sync per optimiser step: deciding whether to apply needs the value.
        applied = bool(torch.isfinite(norm))
        if applied:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied

    def lr(self) -> float:
        """The base lr now (group lr divided by its ViT layer-decay scale)."""
        group = self.scheduler.optimizer.param_groups[0]
        return group["lr"] / group.get("lr_scale", 1.0)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place); identity without a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_min(value: int, device: torch.device) -> int:
    """The smallest of every rank's ``value``; ``value`` itself without a process group."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown_distributed() -> None:
    """Leave the process group once every rank is done. Without it the backend's threads are torn down by
    the interpreter's exit: under load a gloo rank then aborts ("terminate called without an active
    exception", exit -6) after a run that succeeded."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()
