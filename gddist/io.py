"""Crash-safe file writes: write a temporary file in the same directory, fsync, rename into place.

A reader sees either the old file or the complete new one, never a half-written file (rename is
atomic within a filesystem).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: Path, write: Any) -> None:
    """Call `write(file_object)` on a temp file next to `path`, then atomically replace `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_torch_save_hashed(obj: Any, path: Path) -> dict[str, Any]:
    """`atomic_torch_save` for big files that need a checksum: returns {"size", "sha256"} of the
    bytes written, hashed on their way out (no second read of the file).

    Made to run beside training with as little CPU and GIL time as it can: where the filesystem
    allows it the bytes go to disk with O_DIRECT, past the page cache (a buffered write spends
    most of its CPU time copying every byte into the page cache), straight from the tensors'
    memory when it is page-aligned (see `aligned_empty_like`); torch.save's zip CRC32 is left out
    (a pass over every byte under the GIL; the sha256 covers every byte, and torch.load never
    checks the CRC). The file loads with torch.load like any other.
    """
    digest = hashlib.sha256()
    size = 0

    def write(f: Any) -> None:
        nonlocal size
        with _DirectWriter(f.fileno(), digest) as out, _zip_settings(BLOCK):
            torch.save(obj, out)
        size = out.size

    atomic_write(path, write)
    return {"size": size, "sha256": digest.hexdigest()}


BLOCK = 4096  # O_DIRECT alignment of memory, file offsets and lengths (a multiple of 512)
ZERO_COPY_MIN = 1 << 20  # smaller tensors are not worth a mapping of their own
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux
_ZIP_LOCK = threading.Lock()


def aligned_empty_like(src: torch.Tensor) -> torch.Tensor:
    """An uninitialized CPU tensor like `src` (dtype, shape, strides) whose memory starts on a
    page: `atomic_torch_save_hashed` writes such a tensor to disk without copying it. Small
    tensors, and every tensor where there is no O_DIRECT, get ordinary memory."""
    like = torch.empty_like(src, device="meta")  # the strides a copy keeps
    nbytes = like.untyped_storage().nbytes()
    if nbytes < ZERO_COPY_MIN or not _O_DIRECT:
        return torch.empty_like(src, device="cpu")
    # Page-aligned; populated in one go (cheaper than a page fault per page on first copy);
    # unmapped with the last tensor that uses it.
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_POPULATE)
    flat = torch.frombuffer(memory, dtype=torch.uint8).view(src.dtype)
    return flat.as_strided(like.shape, like.stride())


@contextlib.contextmanager
def _zip_settings(alignment: int) -> Iterator[None]:
    """torch.save without its per-record CRC32 and with each tensor's bytes at a file offset
    that is a multiple of `alignment`, where this torch has these settings. They are
    process-wide and read once when a torch.save starts: one that starts in another thread
    meanwhile only gets them too (its file loads the same)."""
    try:
        from torch.utils.serialization.config import save
    except ImportError:  # an older torch: its defaults (the writes are only slower)
        save = None
    wanted = {"compute_crc32": False, "storage_alignment": alignment}
    with _ZIP_LOCK:
        before = {k: getattr(save, k) for k in wanted if hasattr(save, k)}
        for k in before:
            setattr(save, k, wanted[k])
        try:
            yield
        finally:
            for k, v in before.items():
                setattr(save, k, v)


class _DirectWriter:
    """A write-only binary file over `fd` that hashes what it writes into `digest`.

    With O_DIRECT (Linux) the bytes go out in whole, aligned blocks: a page-aligned chunk that
    starts on a block boundary of the file is written from where it is; the rest is gathered
    in a page-aligned buffer. The last, partial block is padded and the file truncated to its
    true size. Where O_DIRECT is refused (some filesystems, other systems) the bytes go
    through the page cache as usual.
    """

    def __init__(self, fd: int, digest: Any, buffer_bytes: int = 8 << 20) -> None:
        self.fd = fd
        self.digest = digest
        self.size = 0  # bytes accepted
        self.direct = _set_direct(fd, True)
        self._buffer = mmap.mmap(-1, buffer_bytes)  # page-aligned, as O_DIRECT needs
        self._view = memoryview(self._buffer)
        self._fill = 0
        self._written = 0  # bytes handed to the file (its size, less the buffered ones)

    def write(self, data: Any) -> int:
        data = memoryview(data).cast("B")
        self.digest.update(data)  # releases the GIL for big chunks, as os.pwrite does
        n = len(data)
        self.size += n
        if not self.direct:
            if self._fill:  # O_DIRECT was given up on while bytes were buffered
                self._drain()
            self._put(data, n)
            return n
        if self._fill % BLOCK == 0 and n >= BLOCK and _address(data) % BLOCK == 0:
            if self._fill:
                self._drain()
            whole = n - n % BLOCK
            self._put(data[:whole], whole)  # zero-copy: from the tensor's memory to disk
            data = data[whole:]
        done = 0
        while done < len(data):
            k = min(len(data) - done, len(self._view) - self._fill)
            self._view[self._fill : self._fill + k] = data[done : done + k]
            self._fill += k
            done += k
            if self._fill == len(self._view):
                self._drain()
        return n

    def flush(self) -> None:
        """Nothing: torch.save calls it; the buffer's tail is written on exit (before fsync)."""

    def _drain(self) -> None:
        """Write out the buffer (with O_DIRECT, a partial last block padded with zeros)."""
        padded = -(-self._fill // BLOCK) * BLOCK if self.direct else self._fill
        self._view[self._fill : padded] = bytes(padded - self._fill)
        self._put(self._view[:padded], self._fill)
        self._fill = 0

    def _put(self, data: memoryview, length: int) -> None:
        """Write data[:length] at the end of what is written; with O_DIRECT all of `data`
        (whole blocks). A filesystem that takes the O_DIRECT flag but refuses its writes gets
        the bytes through the page cache."""
        if self.direct:
            try:
                _pwrite_all(self.fd, data, self._written)
                self._written += length
                return
            except OSError as e:
                if e.errno != errno.EINVAL or self._written:
                    raise
                self.direct = _set_direct(self.fd, False)
        _pwrite_all(self.fd, data[:length], self._written)
        self._written += length

    def __enter__(self) -> _DirectWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if exc[0] is None and self._fill:
                self._drain()
                if self.direct:
                    os.ftruncate(self.fd, self.size)  # drop the padding of the last block
        finally:  # the buffer is unmapped with its last view (an error's traceback may hold one)
            del self._view, self._buffer


def _address(data: memoryview) -> int:
    import numpy as np

    return np.frombuffer(data, dtype=np.uint8).ctypes.data


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for `fd`; whether it is on (never where the system or the
    filesystem does not have it)."""
    if not _O_DIRECT:
        return False
    import fcntl  # POSIX only, like O_DIRECT

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | _O_DIRECT if on else flags & ~_O_DIRECT)
    except OSError:
        return False
    return on


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def atomic_save_json(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop the rows of a JSONL log whose "step" is beyond `max_step` (atomically)."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= max_step]
    if len(keep) != len(lines):
        atomic_write(path, lambda f: f.write("".join(ln + "\n" for ln in keep).encode()))
