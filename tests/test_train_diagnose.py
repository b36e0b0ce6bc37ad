"""The diagnosis aids (train/diagnose.py): which steps are profiled, and the memory report at the peak."""

import re

import torch

from train.diagnose import _env_steps, live_at_peak, profiled


def frame(path: str, line: int, name: str) -> dict:
    return {"filename": path, "line": line, "name": name}


def test_profiled_steps_come_from_a_comma_separated_list(monkeypatch):
    monkeypatch.setenv("VLRECIPE_PROFILE_STEP", "9,11")
    assert _env_steps("VLRECIPE_PROFILE_STEP") == {9, 11}
    monkeypatch.setenv("VLRECIPE_PROFILE_STEP", "8")
    assert _env_steps("VLRECIPE_PROFILE_STEP") == {8}
    monkeypatch.delenv("VLRECIPE_PROFILE_STEP")
    assert _env_steps("VLRECIPE_PROFILE_STEP") == set()


def test_the_memory_report_lists_what_was_live_at_the_highest_point_by_our_allocating_line():
    """Replaying the allocator's trace: the peak is after the second allocation (3 GiB live); the third comes
    after a free and never meets the first two. Our own frame names an allocation before a library's."""
    gib = 2**30
    ours = [
        frame("/x/torch/nn/modules/linear.py", 125, "forward"),
        frame("/repo/models/vlm.py", 80, "encode_images"),
    ]
    library = [frame("/site-packages/transformers/models/qwen2/modeling_qwen2.py", 297, "forward")]
    events = [
        {"action": "alloc", "addr": 1, "size": 1 * gib, "frames": ours},
        {"action": "alloc", "addr": 2, "size": 2 * gib, "frames": library},
        {"action": "free_requested", "addr": 2},
        {"action": "free_completed", "addr": 2},
        {"action": "alloc", "addr": 3, "size": 1 * gib, "frames": library},
    ]
    report = live_at_peak({"device_traces": [events]}, before=5 * gib)
    lines = report.splitlines()
    assert "3.00 GiB allocated while recording (+ 5.00 GiB" in lines[0]
    assert "2.000 GiB  transformers/models/qwen2/modeling_qwen2.py:297 forward" in lines[1]
    assert "1.000 GiB  models/vlm.py:80 encode_images" in lines[2]
    assert len(lines) == 3


def test_gpu_busy_time_is_the_union_of_kernel_spans():
    """Overlapping kernels (two streams) and nested spans count once; gaps do not count."""
    from train.diagnose import busy_time

    assert busy_time([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
    assert busy_time([]) == 0


def test_a_profiled_step_reports_the_ops_by_their_own_host_time(monkeypatch, capsys):
    """The step named by VLRECIPE_PROFILE_STEP prints its ops, then the same ops by their own host time (where
    a step the GPU waits on spends it); other steps print nothing."""
    monkeypatch.setenv("VLRECIPE_PROFILE_STEP", "2")
    for step in (1, 2):
        with profiled(step, is_main=True):
            x = torch.randn(64, 64, requires_grad=True)
            (x @ x).sum().backward()
            float(x.grad.norm())  # .item(): a device->host wait on a GPU
    out = capsys.readouterr().out
    assert "profile of step 1" not in out and "profile of step 2:" in out
    host = out.split("host time of step 2 by op (self CPU time):")[1]
    rows = [line for line in host.splitlines() if line.strip().startswith(("aten::", "autograd"))]
    assert "aten::mm" in [row.split()[0] for row in rows[:3]]  # the matrix product's own time leads
    # ordered by each op's own time (Self CPU, the column after Self CPU %), not by its callers' totals
    self_us = [own_time_us(row) for row in rows]
    assert len(self_us) > 3 and self_us == sorted(self_us, reverse=True)


def own_time_us(row: str) -> float:
    """The Self CPU column of a profiler table row, in microseconds."""
    value, unit = re.search(r"\d+\.\d+%\s+(\d+\.\d+)(us|ms|s)\b", row).groups()
    return float(value) * {"us": 1, "ms": 1e3, "s": 1e6}[unit]
