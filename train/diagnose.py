"""Diagnosis aids for the training loop, off unless an environment variable asks for them.

- ``VLRECIPE_PROFILE_STEP=N`` (or ``N,M,...``): profile step N (forward, backward and optimiser step) with
  torch.profiler; rank 0 prints the top kernels by device time, the step's wall time and how much of it the
  GPU was busy, the ops by their own host time (a step the GPU waits on: where the host spends it), and,
  with ``VLRECIPE_PROFILE_DIR=DIR``, writes DIR/trace_stepN.json.gz (chrome://tracing, Perfetto).
- ``VLRECIPE_MEMORY_STEP=N``: record every CUDA allocation from the first step to the end of step N
  (torch.cuda.memory._record_memory_history), then print what was live at the peak, grouped by the
  allocating source line, and write the snapshot to ``VLRECIPE_PROFILE_DIR`` (pytorch.org/memory_viz).
  Run it with ``perf.compile_llm=false perf.compile_vision=false``: with compiled layers, torch 2.11 failed in
  the first step while recording (SystemError from autograd's Function.apply, one H100, 2026-12-06).

Written here rather than in the loop so that the loop reads as training; both only observe.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import pickle
import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

PROJECT_DIRS = ("/models/", "/train/", "/data/")  # frames of ours name an allocation best
LIBRARY_HINTS = (
    "transformers/",
    "peft/",
    "liger_kernel/",
    "torch/nn/",
    "torch/utils/checkpoint",
    "torch/optim/",
)


def _env_steps(name: str) -> set[int]:
    return {int(v) for v in os.environ.get(name, "").split(",") if v.strip().isdigit()}


def _out_dir() -> Path | None:
    value = os.environ.get("VLRECIPE_PROFILE_DIR")
    return Path(value) if value else None


@contextlib.contextmanager
def profiled(step: int, is_main: bool):
    """Profile optimiser step ``step`` when ``VLRECIPE_PROFILE_STEP`` names it (rank 0 only)."""
    if not is_main or step not in _env_steps("VLRECIPE_PROFILE_STEP"):
        yield
        return
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        yield
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - start
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    averages = prof.key_averages()
    lines = [f"profile of step {step}:", averages.table(sort_by=sort, row_limit=30, max_name_column_width=70)]
    if cuda:
        kernels = [
            (e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA
        ]
        busy = busy_time(kernels) / 1e6
        lines.append(
            f"step {step}: wall {wall * 1e3:.0f} ms, GPU kernels {busy * 1e3:.0f} ms "
            f"({100 * busy / wall:.0f}% busy)"
        )
    # Where a step the GPU waits on spends its host time: the ops' own CPU time, the CUDA runtime's calls
    # among them (the count of cudaStreamSynchronize is the device->host waits: .item(), .tolist(), .cpu()).
    lines += [
        f"host time of step {step} by op (self CPU time):",
        averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70),
    ]
    print("\n".join(lines), flush=True)
    out = _out_dir()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        trace = out / f"trace_step{step}.json"
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()
        print(f"wrote {trace}.gz", flush=True)


def busy_time(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) spans: the time a device ran any kernel (a sum of kernel times
    would count overlapping kernels, and kernels listed under their launching op, twice)."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return busy


_recording_began_at = 0  # bytes allocated when recording began (weights; the trace holds the rest)


def start_memory_recording(is_main: bool) -> None:
    """Start recording allocations (before the first step) when ``VLRECIPE_MEMORY_STEP`` is set."""
    global _recording_began_at
    if is_main and torch.cuda.is_available() and _env_steps("VLRECIPE_MEMORY_STEP"):
        _recording_began_at = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")


def finish_memory_recording(step: int, is_main: bool) -> None:
    """After step ``VLRECIPE_MEMORY_STEP``: print the live allocations at the recorded peak and stop."""
    if (
        not is_main
        or not torch.cuda.is_available()
        or step != max(_env_steps("VLRECIPE_MEMORY_STEP"), default=0)
    ):
        return
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    out = _out_dir()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        with gzip.open(out / f"memory_step{step}.pickle.gz", "wb") as f:
            pickle.dump(snapshot, f)
    print(live_at_peak(snapshot, _recording_began_at), flush=True)


def _where(frames: list[dict]) -> str:
    """The source line that best names an allocation: our own code's innermost frame, else a library's."""
    for wanted in (PROJECT_DIRS, LIBRARY_HINTS):
        for f in frames:
            name = f.get("filename", "")
            if any(w in name for w in wanted) and "diagnose.py" not in name:
                short = (
                    name.split("site-packages/")[-1]
                    if "site-packages/" in name
                    else "/".join(name.split("/")[-2:])
                )
                return f"{short}:{f.get('line')} {f.get('name')}"
    return "(no Python frame)"


def live_at_peak(snapshot: dict, before: int = 0, top: int = 25) -> str:
    """Replay the recorded allocation trace of device 0; report the tensors live at its highest point,
    grouped by where they were allocated. ``before``: bytes allocated when recording began."""
    events = snapshot["device_traces"][0] if snapshot.get("device_traces") else []

    def replay(stop: int) -> tuple[dict[int, tuple[int, dict]], int, int]:
        """Live allocations after events[:stop]; (live, index of the highest point, its total)."""
        live: dict[int, tuple[int, dict]] = {}
        total, peak, peak_at = 0, 0, 0
        for i, e in enumerate(events[:stop]):
            if e["action"] == "alloc":
                live[e["addr"]] = (e["size"], e)
                total += e["size"]
                if total > peak:
                    peak, peak_at = total, i + 1
            elif e["action"] in ("free_requested", "free_completed") and e["addr"] in live:
                total -= live.pop(e["addr"])[0]
        return live, peak_at, peak

    _, peak_at, peak = replay(len(events))
    at_peak, _, _ = replay(peak_at)
    groups: dict[str, int] = defaultdict(int)
    for size, event in at_peak.values():
        groups[_where(event.get("frames", []))] += size
    lines = [
        f"memory at the recorded peak: {peak / 2**30:.2f} GiB allocated while recording "
        f"(+ {before / 2**30:.2f} GiB still live from before it), by allocating line:"
    ]
    for where, size in sorted(groups.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {size / 2**30:7.3f} GiB  {where}")
    return "\n".join(lines)
