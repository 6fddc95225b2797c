"""Crash-safe file writes: write a temporary file in the same directory, fsync, rename into place.

A reader sees either the old file or the complete new one, never a half-written file (rename is
atomic within a filesystem). A write the OS refuses (full disk, quota, permissions, read-only
filesystem) is a `DiskError`: one line naming the path, the cause and the fix, and no temporary
file is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import mmap
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gddist.config import UserError

log = logging.getLogger("gddist")

# What the OS says when a write cannot succeed whatever the program does: the user must act.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})


class DiskError(UserError):
    """A write the OS refused for a reason the user must fix (DISK_ERRNOS): one line naming the
    path, the cause (strerror) and the fix; `key` is the setting that moves the output."""

    def __init__(
        self, path: Path | str, code: int, key: str = "hydra.run.dir", where: Path | None = None
    ) -> None:
        self.path, self.errno, self.key = Path(path), code, key
        if where is None:  # the directory whose filesystem is at fault
            where = self.path if self.path.is_dir() else self.path.parent
        if code in (errno.ENOSPC, errno.EDQUOT):
            fix = f"free space (or quota) on the filesystem of {where}"
        elif code == errno.EROFS:
            fix = f"{where} is on a read-only filesystem: remount it read-write"
        else:
            fix = f"make {where} writable by this user"
        super().__init__(
            f"cannot write {path}: {os.strerror(code)}; {fix}, or set {key}=<a writable "
            "directory with room>"
        )


def is_disk_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_ERRNOS


@contextlib.contextmanager
def disk_errors(
    path: Path | str, key: str = "hydra.run.dir", name_os_file: bool = True
) -> Iterator[None]:
    """Turn an OSError in DISK_ERRNOS raised inside into a DiskError naming `path` (or, with
    `name_os_file`, the file the OS named) and `key`; a DiskError from inside keeps its path and
    gets `key`."""
    try:
        yield
    except DiskError as e:
        if e.key == key:
            raise
        raise DiskError(e.path, e.errno, key) from None
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        named = e.filename if name_os_file and e.filename else path
        raise DiskError(named, e.errno, key) from None


def atomic_write(path: Path, write: Any) -> None:
    """Call `write(file_object)` on a temp file next to `path`, then atomically replace `path`.

    The file gets the mode a plain open() gives (0666 less the umask: the kernel applies it),
    not mkstemp's 0600. A refused write (DISK_ERRNOS) raises DiskError naming `path`; the
    temporary file is removed whatever goes wrong.
    """
    path = Path(path)
    with disk_errors(path, name_os_file=False):  # `path`, not the name of its temporary file
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new, empty `.NAME.RANDOM.tmp` next to `path`, opened for writing."""
    while True:
        tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # a name drawn twice: draw again
            continue


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


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file's content; None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def atomic_save_json(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop the rows of a JSONL log whose "step" is beyond `max_step` (atomically).

    The log is appended without fsync, so a crash of the node can tear its LAST line (a row cut
    short, or bytes of zeros): that line is dropped with a warning. An undecodable line anywhere
    else is no crash's doing (someone edited the file, or the disk corrupted it): a UserError
    names the file and the line number, and nothing is changed. The file always ends with a
    newline afterwards.
    """
    path = Path(path)
    if not path.exists():
        return
    with disk_errors(path):
        text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")  # the rows as written: "\n" ends each one
    if lines[-1] == "":
        lines.pop()
    keep = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = row.get("step", 0)
        except (ValueError, AttributeError):
            if number < len(lines):
                raise UserError(
                    f"{path} line {number} is not a JSON row: fix or delete that line (or move "
                    "the file away to start the log afresh), then rerun"
                ) from None
            log.warning("%s: dropping its torn last line (%d bytes)", path, len(line))
            continue
        if step <= max_step:
            keep.append(line)
    if len(keep) != len(lines) or (text and not text.endswith("\n")):
        atomic_write(path, lambda f: f.write("".join(ln + "\n" for ln in keep).encode()))


def repair_jsonl_tail(path: Path) -> None:
    """Before appending to a JSONL log: if it does not end with a newline (a torn write), drop
    the torn fragment after its last newline, or end a complete last row with its newline, so
    the next row starts on a line of its own."""
    path = Path(path)
    with disk_errors(path):
        if not path.exists() or path.stat().st_size == 0:
            return
        with path.open("rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            data = f.read()
            cut = data.rfind(b"\n") + 1  # 0: the fragment is the whole file
            try:
                json.loads(data[cut:])
            except ValueError:
                log.warning("%s: dropping its torn last line (%d bytes)", path, len(data) - cut)
                f.truncate(cut)
            else:
                f.write(b"\n")
