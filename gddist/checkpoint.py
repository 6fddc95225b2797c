"""Checkpoints that survive crashes: written whole or not at all, resumed from the newest good one.

Layout: CKPT_DIR/step_000001200/ holds `state.pt` (model, optimizer, scheduler, grad scaler,
trainer state, config, world size, tracker run id: written by rank 0), `rank_00000.pt` ... (each
rank's RNG states) and `manifest.json` (size and sha256 of every file). A save writes everything
into a hidden `.tmp-step_...` directory; rank 0 waits until every rank's part is there, writes the
manifest and renames the directory into place. A directory named `step_*` is therefore complete
unless the disk lied, and the manifest catches that (truncated or corrupt files are reported and
skipped). With checkpoint.async=true the same writing runs in a background thread on a snapshot:
CPU copies of the state in staging buffers that are allocated by the first save and reused by the
next ones (pinned memory for CUDA tensors), so a save blocks training only for one memory copy.

Loading uses `torch.load(..., weights_only=True)`: a checkpoint is data, never code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gddist.config import CheckpointConfig, UserError
from gddist.dist import Dist
from gddist.io import aligned_empty_like, atomic_save_json, atomic_torch_save_hashed

log = logging.getLogger("gddist")

FORMAT = 1
STATE = "state.pt"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^step_(\d{9})$")
# How much nicer than training the background writer runs (Linux): on a busy machine it takes the
# CPU time that training leaves, rather than time slices of the training thread.
WRITER_NICE = 10


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


class CorruptCheckpoint(Exception):
    """A checkpoint directory that is incomplete, truncated, corrupt or unsafe to load."""


class Checkpointer:
    """Saves and finds checkpoints for one run; `save` and `find_resume` are collective calls."""

    def __init__(
        self, cfg: CheckpointConfig, run_dir: Path, dist: Dist, timeout_s: float = 1800.0
    ) -> None:
        self.cfg = cfg
        self.dist = dist
        self.dir = Path(cfg.dir) if cfg.dir else Path(run_dir) / "checkpoints"
        self.timeout_s = timeout_s  # how long rank 0 waits for the other ranks' parts
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._staging = Staging()

    # ------------------------------------------------------------------ save

    def save(self, step: int, state: dict[str, Any], rank_state: dict[str, Any]) -> None:
        """Checkpoint `step`: every rank calls this at the same step with its own `rank_state`;
        `state` is used from rank 0. Nothing named step_* exists until every rank's part is on
        disk.

        Synchronous (default): returns once the checkpoint is complete on every rank.
        checkpoint.async=true: returns once the state is snapshotted (copied off the live
        tensors into staging buffers); a background thread writes it while training goes on.
        At most one save is in flight: the next save (or `wait`) first waits for the previous
        one, which is what makes reusing the staging buffers safe (the background writer never
        reads a buffer that is being refilled).
        """
        self.wait()
        # A name unique to this save (agreed with a collective here, in the main thread): parts of
        # an earlier, crashed attempt at the same step can never be mistaken for this one's.
        token = self.dist.broadcast_object(os.urandom(6).hex() if self.dist.is_main else None)
        tmp = self.dir / f".tmp-step_{step:09d}-{token}"
        if not self.cfg.async_save:
            self._write(step, tmp, state, rank_state)
            self.dist.barrier()
            return
        staged = self._staging.snapshot(self._to_stage(state, rank_state))
        state, rank_state = staged["state"], staged["rank"]
        self._thread = threading.Thread(
            target=self._write_in_background, args=(step, tmp, state, rank_state), daemon=True
        )
        self._thread.start()

    def reserve(self, state: dict[str, Any], rank_state: dict[str, Any]) -> None:
        """checkpoint.async=true: allocate the staging buffers for states shaped like these in
        the background now (e.g. after the first optimizer step, once the optimizer state
        exists), so that the first save is a copy into ready memory. A no-op for synchronous
        checkpoints; not a collective."""
        if self.cfg.async_save:
            self._staging.reserve(self._to_stage(state, rank_state))

    def _to_stage(self, state: dict[str, Any], rank_state: dict[str, Any]) -> dict[str, Any]:
        # Only rank 0 writes the shared state: other ranks stage their own part alone.
        return {"state": state if self.dist.is_main else None, "rank": rank_state}

    def wait(self) -> None:
        """Block until the in-flight background save is complete; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write_in_background(self, *args: Any) -> None:
        try:
            _lower_this_threads_priority()
            self._write(*args)
        except BaseException as e:  # surfaced by the next wait(), in the training thread
            self._error = e

    def _write(
        self, step: int, tmp: Path, state: dict[str, Any], rank_state: dict[str, Any]
    ) -> None:
        """Write this rank's part; rank 0 also writes the shared state, waits for every rank's
        part (files appear only when complete), writes the manifest and renames into place.
        No collectives: this may run in a background thread while training uses the group."""
        tmp.mkdir(parents=True, exist_ok=True)
        own = rank_file(self.dist.rank)
        described = {own: atomic_torch_save_hashed(rank_state, tmp / own)}
        if not self.dist.is_main:
            return
        described[STATE] = atomic_torch_save_hashed(state, tmp / STATE)
        expected = [rank_file(r) for r in range(self.dist.world_size)]
        deadline = time.monotonic() + self.timeout_s
        while not all((tmp / name).exists() for name in expected):
            if time.monotonic() > deadline:
                raise TimeoutError(f"checkpoint {tmp.name}: not every rank wrote its part")
            time.sleep(0.01)
        files = [STATE, *expected]
        manifest = {
            "format": FORMAT,
            "step": step,
            "world_size": self.dist.world_size,
            # Rank 0's files were hashed while being written; the other ranks' (small) are read.
            "files": {name: described.get(name) or _describe(tmp / name) for name in files},
        }
        atomic_save_json(manifest, tmp / MANIFEST)
        final = self.dir / f"step_{step:09d}"
        if final.exists():  # this step was saved already (a final save after a periodic one)
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
            _fsync_dir(self.dir)
        self._prune()

    def _prune(self) -> None:
        """Keep the `keep_last` newest complete checkpoints (never the newest one), and drop
        temporary dirs of saves that crashed (none is in flight: this save was the only one)."""
        for old in self.complete()[: -self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.dir.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    # ------------------------------------------------------------------ find and load

    def complete(self) -> list[Path]:
        """Checkpoint directories (renamed into place) in step order, oldest first."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.is_dir() and _NAME.match(p.name))

    def find_resume(self) -> Path | None:
        """The checkpoint to resume from, the same on every rank (rank 0 decides).

        resume=never: None. resume=<path>: that checkpoint, or a UserError saying why not.
        resume=auto: the newest checkpoint that verifies; each bad one is reported in one line and
        skipped for the previous one; None when there is none (a fresh start).
        """
        choice: Path | None = None
        if self.dist.is_main:
            choice = self._choose()
        return self.dist.broadcast_object(choice)

    def _choose(self) -> Path | None:
        resume = self.cfg.resume
        if resume == "never":
            return None
        if resume != "auto":
            path = Path(resume)
            try:
                verify(path)
            except CorruptCheckpoint as e:
                raise UserError(f"checkpoint.resume={resume}: {e}") from None
            return path
        for path in reversed(self.complete()):
            try:
                verify(path)
                return path
            except CorruptCheckpoint as e:
                log.warning("skipping checkpoint %s: %s", path, e)
        return None

    def load(self, path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(shared state, this rank's state or None when the checkpoint had fewer ranks)."""
        state = safe_load(path / STATE)
        own = path / rank_file(self.dist.rank)
        return state, (safe_load(own) if own.exists() else None)


def verify(path: Path) -> None:
    """Raise CorruptCheckpoint unless every file in the manifest has its recorded size and hash,
    and the shared state loads with weights_only=True."""
    if not path.is_dir():
        raise CorruptCheckpoint(f"{path} is not a checkpoint directory")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"no readable {MANIFEST} ({type(e).__name__})") from None
    if manifest.get("format") != FORMAT:
        raise CorruptCheckpoint(f"format {manifest.get('format')!r}, this gddist reads {FORMAT}")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CorruptCheckpoint(f"{name} is missing")
        if file.stat().st_size != expected["size"]:
            raise CorruptCheckpoint(
                f"{name} is truncated or changed ({file.stat().st_size} bytes, "
                f"expected {expected['size']})"
            )
        if _sha256(file) != expected["sha256"]:
            raise CorruptCheckpoint(f"{name} is corrupt (checksum mismatch)")
    safe_load(path / STATE)


def safe_load(path: Path) -> Any:
    """torch.load with weights_only=True; a file that needs pickled code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CorruptCheckpoint(
            f"{path.name} needs pickled code to load and is refused (weights_only=True): "
            f"{str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CorruptCheckpoint(f"{path.name} cannot be read ({str(e).splitlines()[0]})") from None


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
            _lower_this_threads_priority()
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


def _lower_this_threads_priority() -> None:
    """Raise the calling thread's nice value by WRITER_NICE. Linux only: there a nice value
    belongs to a thread; elsewhere it would apply to the whole process. Raising it needs no
    privilege."""
    if sys.platform != "linux":
        return
    tid = threading.get_native_id()
    nice = min(19, os.getpriority(os.PRIO_PROCESS, tid) + WRITER_NICE)
    os.setpriority(os.PRIO_PROCESS, tid, nice)


def _describe(file: Path) -> dict[str, Any]:
    return {"size": file.stat().st_size, "sha256": _sha256(file)}


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
