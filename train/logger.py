"""Where training metrics go: the console, ``metrics.jsonl`` in the run directory, and wandb or
TensorBoard. Only rank 0 logs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from train.recipe import LogSection

# Dense bf16 peak of one accelerator, for MFU. Override with PEAK_TFLOPS (e.g. for other GPUs).
_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H20": 148.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def peak_flops_per_device() -> float | None:
    """Peak FLOP/s of one device, or None when unknown (then MFU is not reported)."""
    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"]) * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in _PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


class MetricLogger:
    def __init__(self, cfg: LogSection, run_dir: Path, is_main: bool, config: dict | None = None):
        self.is_main = is_main
        self.backend = None
        self.jsonl = None
        if not is_main:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        if cfg.backend == "wandb":
            import wandb  # optional heavy dependency: only log.backend wandb imports it (seconds)

            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            self.backend = wandb.init(
                project=cfg.project, name=cfg.run_name, dir=str(run_dir), mode=mode, config=config or {}
            )
        elif cfg.backend == "tensorboard":
            # optional heavy dependency: only log.backend tensorboard imports it (seconds)
            from torch.utils.tensorboard import SummaryWriter

            self.backend = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, metrics: dict[str, float], step: int, console: bool = True) -> None:
        if not self.is_main:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if console:
            text = "  ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
            )
            print(f"step {step}  {text}", flush=True)
        if self.backend is None:
            return
        if hasattr(self.backend, "add_scalar"):
            for key, value in metrics.items():
                self.backend.add_scalar(key, value, step)
        else:
            self.backend.log(metrics, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.backend is not None:
            (self.backend.close if hasattr(self.backend, "close") else self.backend.finish)()
