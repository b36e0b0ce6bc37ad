"""Saved activations parked in pinned host memory between a forward and its backward
(``perf.offload_activations``).

With every decoder layer checkpointed, what autograd keeps on the GPU across a forward is each layer's input
(tokens x hidden x 2 bytes per layer: 2 GiB at 8,192 tokens through a 32-layer, 4096-wide decoder) and a few
small tensors; each layer's inner activations are recomputed in backward anyway. This moves every such saved
tensor to pinned host memory on a side stream while the forward goes on, and copies it back ahead of the
backward that needs it: when the backward unpacks one, the one saved before it is fetched on another side
stream while this layer recomputes and back-propagates. The values are the same tensors, so the loss and
gradients are exactly those without offloading.

Written here rather than taken from a library: torch's ``save_on_cpu`` copies synchronously (the host waits
for every copy) and fetches each tensor only when backward asks for it; torchtune's ``OffloadActivations``
does what this does but torchtune is not a dependency of this project.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

MIN_BYTES = 1 << 20  # smaller saved tensors stay on the GPU: their copies would cost more than they free


@dataclass
class _Parked:
    host: torch.Tensor  # pinned
    device: torch.device
    copied: torch.cuda.Event  # the device->host copy is done
    fetched: torch.Tensor | None = None  # on the GPU again, prefetched on the fetch stream
    fetched_event: torch.cuda.Event | None = None
    unpacked: bool = False  # backward has taken it (not prefetched again)


class ActivationOffload:
    """``with offload.saved_on_host(): loss = model(...)``, then ``loss.backward()`` as usual (CUDA only)."""

    def __init__(self, min_bytes: int = MIN_BYTES):
        self.min_bytes = min_bytes
        self.to_host = torch.cuda.Stream()
        self.to_device = torch.cuda.Stream()

    @contextlib.contextmanager
    def saved_on_host(self):
        parked: list[_Parked] = []  # this forward's, in the order the forward saved them

        def pack(tensor: torch.Tensor):
            # Only activations: a tensor with a grad_fn is the output of a recorded op (a layer's input, a
            # norm's input). Weights, their casts and views, and bookkeeping tensors have none and stay put.
            if (
                not tensor.is_cuda
                or tensor.grad_fn is None
                or tensor.numel() * tensor.element_size() < self.min_bytes
            ):
                return tensor
            compute = torch.cuda.current_stream(tensor.device)
            host = torch.empty_like(tensor, device="cpu", pin_memory=True)
            self.to_host.wait_stream(compute)  # the tensor is fully written
            with torch.cuda.stream(self.to_host):
                host.copy_(tensor, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self.to_host)
            tensor.record_stream(self.to_host)  # its memory is not reused before the copy has read it
            parked.append(_Parked(host, tensor.device, copied))
            return len(parked) - 1

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            item = parked[packed]
            if item.fetched is None:
                self._fetch(item)
            compute = torch.cuda.current_stream(item.device)
            compute.wait_event(item.fetched_event)
            tensor, item.fetched, item.fetched_event, item.unpacked = item.fetched, None, None, True
            tensor.record_stream(compute)
            before = parked[packed - 1] if packed > 0 else None
            if before is not None and before.fetched is None and not before.unpacked:
                self._fetch(before)  # backward runs in reverse: the previous layer's input is next
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    def _fetch(self, item: _Parked) -> None:
        with torch.cuda.stream(self.to_device):
            self.to_device.wait_event(item.copied)
            item.fetched = item.host.to(item.device, non_blocking=True)
            item.fetched_event = torch.cuda.Event()
            item.fetched_event.record(self.to_device)
