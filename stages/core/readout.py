"""Reading a value the GPU computes without making the CPU wait for it.

`loss.item()` in a training loop blocks the CPU until the GPU has finished every kernel queued so
far: the CPU then stops queueing the next steps, and a small model's GPU idles between them. A
progress bar only needs a recent value, not the current one: copy it into pinned host memory
without blocking, record an event, and read the copy once the event says it has arrived.
"""

from __future__ import annotations

import torch


class LatestValue:
    """The newest value of a 0-d device tensor that has reached the host, without a host sync.

    `offer(t)` starts a copy of `t` when none is in flight; `value()` returns the newest finished
    copy (NaN before the first). On the CPU the value is read at once: there is nothing to wait for."""

    def __init__(self, device: torch.device):
        self.on_cuda = device.type == "cuda"
        self._host = torch.zeros((), dtype=torch.float32, pin_memory=self.on_cuda)
        self._arrived: torch.cuda.Event | None = None
        self._value = float("nan")

    def offer(self, tensor: torch.Tensor) -> None:
        if not self.on_cuda:
            self._value = float(tensor.detach())
            return
        self._collect()
        if self._arrived is None:
            self._host.copy_(tensor.detach().float(), non_blocking=True)
            self._arrived = torch.cuda.Event()
            self._arrived.record()

    def value(self) -> float:
        self._collect()
        return self._value

    def _collect(self) -> None:
        if self._arrived is not None and self._arrived.query():  # query() never blocks
            self._value, self._arrived = float(self._host), None
