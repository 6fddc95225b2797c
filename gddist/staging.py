"""Staging buffers for asynchronous checkpoints: CPU copies of the training state that a
background writer reads while training goes on (see gddist/checkpoint.py)."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch

from gddist.io import aligned_empty_like

# How much nicer than training the background writer runs (Linux): on a busy machine it takes the
# CPU time that training leaves, rather than time slices of the training thread.
WRITER_NICE = 10


class Staging:
    """CPU copies of a state tree, in buffers kept from one snapshot to the next.

    A fresh 400 MB copy spends most of its time in page faults of the new memory; copying into
    buffers that already exist is a plain memcpy. A buffer is keyed by its place in the tree and
    reused while the tensor there keeps its dtype, shape and strides; buffers whose place is gone
    are dropped. CUDA tensors are staged in pinned memory with non-blocking copies and one
    synchronize at the end. The buffers stay allocated (the size of the state) for the life of
    this object.

    `reserve` allocates the buffers ahead of the first snapshot in a background thread (and
    touches their memory), so that the first save too is only a copy.

    The caller must not snapshot again while a reader of the previous snapshot is still running:
    the next snapshot overwrites the same buffers (`Checkpointer.save` waits for the previous
    background write first).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], tuple[tuple[Any, ...], torch.Tensor]] = {}
        self._reserving: threading.Thread | None = None

    def reserve(self, tree: Any) -> None:
        """Start allocating, in a background thread, the buffers a snapshot of a tree shaped like
        `tree` needs (only shapes and dtypes are read; the allocation and the first touch of the
        memory, page faults included, run beside training). The next `snapshot` waits for it."""
        self._join()
        wanted = {
            path: (_buffer_key(src), torch.empty_like(src, device="meta"))
            for path, src in _leaves(tree, ())
            if _stageable(src)
        }

        def allocate() -> None:
            lower_this_threads_priority()
            for path, (key, template) in wanted.items():
                found = self._buffers.get(path)
                if not (found and found[0] == key):
                    buf = _new_buffer(template, pin=key[-1])
                    buf.zero_()  # fault the pages in here, not in the first snapshot's copy
                    self._buffers[path] = (key, buf)

        self._reserving = threading.Thread(target=allocate, daemon=True)
        self._reserving.start()

    def snapshot(self, tree: Any) -> Any:
        """`tree` with every tensor replaced by its CPU copy (dicts, lists and tuples rebuilt,
        other leaves shared): what a background writer may read while the training loop keeps
        changing the live weights and optimizer state."""
        self._join()
        used: dict[tuple[Any, ...], tuple[tuple[Any, ...], torch.Tensor]] = {}
        cuda: set[torch.device] = set()

        def stage(src: torch.Tensor, path: tuple[Any, ...]) -> torch.Tensor:
            if not _stageable(src):
                return src.to("cpu", copy=True)  # subclasses, sparse, quantized: a plain copy
            key = _buffer_key(src)
            found = self._buffers.get(path)
            buf = found[1] if found and found[0] == key else _new_buffer(src, pin=key[-1])
            buf.copy_(src, non_blocking=key[-1])
            used[path] = (key, buf)
            if src.is_cuda:
                cuda.add(src.device)
            return buf

        def copy(node: Any, path: tuple[Any, ...]) -> Any:
            if isinstance(node, torch.Tensor):
                return stage(node.detach(), path)
            if isinstance(node, dict):
                return {k: copy(v, (*path, k)) for k, v in node.items()}
            if isinstance(node, list | tuple):
                return type(node)(copy(v, (*path, i)) for i, v in enumerate(node))
            return node

        copies = copy(tree, ())
        for device in cuda:
            torch.cuda.synchronize(device)  # the non-blocking device-to-host copies have landed
        self._buffers = used
        return copies

    def _join(self) -> None:
        if self._reserving is not None:
            self._reserving.join()
            self._reserving = None


def _stageable(src: torch.Tensor) -> bool:
    """A plain dense tensor (subclasses, sparse and quantized ones are copied as they are)."""
    return type(src) is torch.Tensor and src.layout == torch.strided and not src.is_quantized


def _buffer_key(src: torch.Tensor) -> tuple[Any, ...]:
    """What a staging buffer must match to be reused; the last item says "pinned"."""
    return (src.dtype, src.shape, src.stride(), src.is_cuda and src.numel() > 0)


def _new_buffer(like: torch.Tensor, pin: bool) -> torch.Tensor:
    """A staging buffer like `like` (its dtype, shape and strides): pinned for a CUDA tensor,
    else page-aligned (written to disk without a copy, see `gddist.io.aligned_empty_like`)."""
    if pin:
        return torch.empty_like(like, device="cpu", pin_memory=True)
    return aligned_empty_like(like)


def _leaves(node: Any, path: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], torch.Tensor]]:
    """(path, tensor) for every tensor in a tree of dicts, lists and tuples."""
    if isinstance(node, torch.Tensor):
        yield path, node.detach()
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list | tuple):
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, i))


def lower_this_threads_priority() -> None:
    """Raise the calling thread's nice value by WRITER_NICE. Linux only: there a nice value
    belongs to a thread; elsewhere it would apply to the whole process. Raising it needs no
    privilege."""
    if sys.platform != "linux":
        return
    tid = threading.get_native_id()
    nice = min(19, os.getpriority(os.PRIO_PROCESS, tid) + WRITER_NICE)
    os.setpriority(os.PRIO_PROCESS, tid, nice)
