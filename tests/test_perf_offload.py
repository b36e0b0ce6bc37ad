"""perf.offload_activations (train.offload): what a checkpointed forward saves for backward waits in pinned
host memory. The gradients are exactly those without offloading, the GPU holds less between forward and
backward, and a tensor's memory is never reused while its copy to the host is still reading it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned memory, streams)"),
]


class Stack(torch.nn.Module):
    """A few checkpointed blocks, as the trainer runs a decoder: each block's input is all autograd keeps."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(
                torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width)
            )
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + checkpoint(block, x, use_reentrant=False)
        return x


def forward_backward(model, x, offload):
    from train.offload import ActivationOffload

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ctx = (
        ActivationOffload().saved_on_host()
        if offload
        else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    )
    before = torch.cuda.memory_allocated()
    with ctx:
        out = model(x)
    held = torch.cuda.memory_allocated() - before  # what the forward left on the GPU for backward
    (out.float() ** 2).mean().backward()
    torch.cuda.synchronize()
    return held, x.grad.clone(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_offloaded_activations_give_the_same_gradients_and_leave_less_on_the_gpu():
    torch.manual_seed(0)
    model = Stack(width=512, depth=6).cuda()
    x = torch.randn(4096, 512, device="cuda")  # 8 MiB per block input
    results = []
    for offload in (False, True):
        m = copy.deepcopy(model)
        results.append(forward_backward(m, x.clone().requires_grad_(), offload))
    (held_plain, dx_plain, grads_plain), (held_offload, dx_offload, grads_offload) = results
    assert torch.equal(dx_offload, dx_plain)
    for name, grad in grads_plain.items():
        assert torch.equal(grads_offload[name], grad), name
    # Five block inputs of 8 MiB (the first is the caller's leaf) stay on the GPU without offloading.
    assert held_plain - held_offload >= 4 * 8 * 2**20, (held_plain, held_offload)


def test_memory_freed_by_the_forward_is_not_overwritten_before_its_copy_has_read_it():
    """The forward frees each block input as soon as autograd has packed it, and the next block reuses the
    memory at once; the side-stream copy must still read the old values (record_stream)."""
    torch.manual_seed(1)
    model = Stack(width=1024, depth=8).cuda()
    x = torch.randn(8192, 1024, device="cuda")
    plain = forward_backward(copy.deepcopy(model), x.clone().requires_grad_(), False)
    for _ in range(3):
        offloaded = forward_backward(copy.deepcopy(model), x.clone().requires_grad_(), True)
        assert torch.equal(offloaded[1], plain[1])
