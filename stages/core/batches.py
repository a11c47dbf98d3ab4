"""Where a split's images live during training, and how batches are gathered from them.

Batches are built by indexing whole uint8 tensors with a permutation: no per-sample Python
`__getitem__`, no collate. A split comes memory-mapped from its file (`prepared.load_prepared`);
then either

  resident   it is indexed where it is: on the GPU after one copy there (CUDA, when it fits), or
             the mapping itself on the CPU, whose pages the OS keeps in its page cache, shared
             by every process on the machine that maps the same file;
  streamed   it stays mapped on the host and `BatchStream`'s background thread gathers the next
             batches into a few reused pinned buffers and copies them to the GPU on a side
             stream, so the GPU does not wait on the disk and no process holds a private copy
             of the split (pinning the whole split would: page-locked memory, per DDP rank).

Both give the same batches in the same order; only where and when the copies happen differ.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

PREFETCH = 3  # batches gathered ahead of the one the loop is using
MAX_FRACTION = 0.4  # of the GPU's free memory a resident split may take (auto)

Index = torch.Tensor | slice  # a batch: row indices, or a range of rows (evaluation)


@dataclass
class Split:
    """One split's uint8 images (N, C, H, W) and int64 labels, and whether batches are streamed from them."""

    images: torch.Tensor
    labels: torch.Tensor
    streamed: bool = False  # on the host; batches come from BatchStream's background thread

    def __len__(self) -> int:
        return len(self.labels)

    def where(self) -> str:
        """Where the batches come from, for the train stage's log and run.json."""
        if self.images.device.type == "cuda":
            return "resident on the GPU"
        return "streamed from the memory-mapped split" if self.streamed else "indexed in the memory-mapped split"


def place_split(images: torch.Tensor, labels: torch.Tensor, device: torch.device, placement: str = "auto",
                max_fraction: float = MAX_FRACTION) -> Split:
    """Decide where a split's batches come from (`train.data_placement`).

    auto: on CUDA the whole split goes to the GPU once when it fits in `max_fraction` of the free
    memory, else it is streamed; on the CPU it is indexed where it is mapped. device: on the
    device regardless. stream: streamed, also on the CPU (where it overlaps reading the file with
    the step)."""
    if placement == "stream":
        return Split(images, labels, streamed=True)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if placement == "device" or images.numel() + labels.numel() * 8 < max_fraction * free:
            return Split(images.to(device), labels.to(device))
        return Split(images, labels, streamed=True)
    return Split(images, labels)


def gather_batch(split: Split, idx: Index, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of a resident split, on `device`: indexed in place (a view for a range of rows)."""
    if isinstance(idx, slice):
        return split.images[idx].to(device), split.labels[idx].to(device)
    return split.images[idx], split.labels[idx]


def batch_stream(split: Split, batches: Sequence[Index], device: torch.device):
    """An iterator over the batches `batches` names, as (uint8 images, int64 labels) on `device`, to
    use as a context manager (`with batch_stream(...) as stream: for x, y in stream: ...`) so that a
    background thread, if any, stops however the loop ends."""
    if split.streamed:
        return BatchStream(split, batches, device)
    return ResidentBatches(split, batches, device)


class ResidentBatches:
    """The batches of a resident split, indexed as they are asked for."""

    def __init__(self, split: Split, batches: Sequence[Index], device: torch.device):
        self.split, self.batches, self.device = split, batches, device

    def __enter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (gather_batch(self.split, idx, self.device) for idx in self.batches)

    def __exit__(self, *exc) -> None:
        pass


@dataclass
class _Slot:
    """One reusable host buffer of a BatchStream, and the event that says its copy to the GPU is done."""

    images: torch.Tensor
    labels: torch.Tensor
    copied: torch.cuda.Event | None = None


class BatchStream:
    """Gathers the batches of a host split on a background thread, up to PREFETCH ahead of the loop.

    On CUDA each batch is gathered into one of PREFETCH + 1 pinned buffers, copied to the GPU on a
    side stream without blocking, and handed over with the event that marks the copy done; the
    loop's stream waits on that event (the GPU waits, not the Python thread), and a buffer is
    refilled only after its event has completed. On the CPU each batch is gathered into a fresh
    tensor (nothing to pin or copy; the thread then overlaps reading the file with the step).
    The queue between the thread and the loop is bounded, so at most PREFETCH batches wait; an
    error in the thread is raised in the loop, and leaving the `with` block (normally, by an
    error or a break) stops the thread.
    """

    _DONE = object()

    def __init__(self, split: Split, batches: Sequence[Index], device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda and device.index is None:
            # torch.device("cuda") means the caller's current GPU; the gathering thread has its own
            # current device (GPU 0), and torch.cuda.set_device refuses a device with no index.
            device = torch.device("cuda", torch.cuda.current_device())
        self.split, self.batches, self.device = split, batches, device
        self.ready: queue.Queue = queue.Queue(maxsize=PREFETCH)
        self.stop = threading.Event()
        self.slots: list[_Slot] = []
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            rows = max((self._rows(idx) for idx in batches), default=0)
            shape = (rows, *split.images.shape[1:])
            self.slots = [_Slot(torch.empty(shape, dtype=torch.uint8, pin_memory=True),
                                torch.empty(rows, dtype=torch.int64, pin_memory=True)) for _ in range(PREFETCH + 1)]
        self.thread = threading.Thread(target=self._run, name="batch-stream", daemon=True)

    def _rows(self, idx: Index) -> int:
        return len(range(*idx.indices(len(self.split)))) if isinstance(idx, slice) else len(idx)

    def __enter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.thread.start()
        return self._iterate()

    def __exit__(self, *exc) -> None:
        self.stop.set()
        while self.thread.is_alive():  # unblock a thread waiting to put a batch
            try:
                self.ready.get(timeout=0.05)
            except queue.Empty:
                pass
        if self.cuda:
            self.copy_stream.synchronize()  # no copy still reading a buffer when they are freed

    def _iterate(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            item = self.ready.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            x, y, copied = item
            if copied is not None:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(copied)  # the step's kernels start after the copy, without a host sync
                x.record_stream(stream)  # allocated on the copy stream, used on this one
                y.record_stream(stream)
            yield x, y

    def _gather(self, k: int, idx: Index) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch k's rows from the mapping into host memory: a reused pinned slot on CUDA, else a new tensor."""
        if isinstance(idx, slice):
            idx = torch.arange(*idx.indices(len(self.split)))
        n = len(idx)
        if self.cuda:
            slot = self.slots[k % len(self.slots)]
            if slot.copied is not None:
                slot.copied.synchronize()  # its last copy to the GPU must be done before it is refilled
            x, y = slot.images[:n], slot.labels[:n]
        else:
            x = torch.empty((n, *self.split.images.shape[1:]), dtype=torch.uint8)
            y = torch.empty(n, dtype=torch.int64)
        torch.index_select(self.split.images, 0, idx, out=x)
        torch.index_select(self.split.labels, 0, idx, out=y)
        return x, y

    def _run(self) -> None:
        try:
            if self.cuda:
                torch.cuda.set_device(self.device)  # this thread's current device: the rank's GPU
            for k, idx in enumerate(self.batches):
                if self.stop.is_set():
                    return
                x, y = self._gather(k, idx)
                copied = None
                if self.cuda:
                    slot = self.slots[k % len(self.slots)]
                    with torch.cuda.stream(self.copy_stream):
                        x = x.to(self.device, non_blocking=True)
                        y = y.to(self.device, non_blocking=True)
                        copied = slot.copied = torch.cuda.Event()
                        copied.record(self.copy_stream)
                self._put((x, y, copied))
            self._put(self._DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, which raises it
            self._put(exc)

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.ready.put(item, timeout=0.05)
                return
            except queue.Full:
                pass
