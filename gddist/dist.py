"""The group of training processes: launch detection, device/backend choice, collectives.

This is the only module that branches on "distributed or not" (fairseq2's gang idea): a world of
one has no process group and every collective is the identity, so the trainer has no
`if distributed:` branches of its own.

Launch detection, in order:
  1. torchrun / torch.distributed.elastic / accelerate launch: RANK, WORLD_SIZE, LOCAL_RANK set.
  2. srun, one task per process: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID (inside a job step);
     the rendezvous host is the first node of SLURM_JOB_NODELIST, the port MASTER_PORT or one
     derived from the job id.
  3. Nothing: a single process.
"""

from __future__ import annotations

import datetime
import os
import re
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

from gddist.config import DistConfig, UserError


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, read from the launcher's environment."""

    launcher: str  # "none" | "torchrun" | "slurm"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    local_world_size: int | None = None  # processes on this node; None where the launcher is mute


def detect_launch(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            launcher="torchrun",
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env["LOCAL_WORLD_SIZE"]) if "LOCAL_WORLD_SIZE" in env else None,
        )
    # SLURM_STEP_ID is set by srun only: a batch script's own shell (no srun) is one process even
    # when the allocation has --ntasks > 1.
    if "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
        port = env.get("MASTER_PORT") or str(slurm_port(int(env["SLURM_JOB_ID"])))
        return LaunchEnv(
            launcher="slurm",
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0],
            master_port=int(port),
            local_world_size=slurm_tasks_on_node(env),
        )
    return LaunchEnv(launcher="none")


def slurm_tasks_on_node(env: Mapping[str, str]) -> int | None:
    """Tasks of this job step on this node, from SLURM's compressed per-node counts
    ('2(x3),1': 2 on each of the first 3 nodes, 1 on the 4th) and SLURM_NODEID; None if absent."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return None
    counts: list[int] = []
    for item in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not match:
            return None
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    node = int(env.get("SLURM_NODEID", 0))
    return counts[node] if 0 <= node < len(counts) else None


def slurm_port(job_id: int) -> int:
    """A rendezvous port derived from the job id, so every task of the job computes the same one."""
    return 15000 + job_id % 20000


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list: 'gpu[01-03,07],cpu1' -> gpu01 gpu02 gpu03 gpu07 cpu1."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        hosts.extend(_expand_host(item))
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [s.strip() for s in items if s.strip()]


def _expand_host(item: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if not match:
        return [item]
    head, tail = item[: match.start()], item[match.end() :]
    out = []
    for part in match.group(1).split(","):
        lo, _, hi = part.partition("-")
        if hi:
            width = len(lo)
            out.extend(f"{head}{n:0{width}d}" for n in range(int(lo), int(hi) + 1))
        else:
            out.append(f"{head}{lo}")
    return [host + rest for host in out for rest in _expand_host(tail)] if tail else out


class PeerFailure(Exception):
    """Another rank died or stopped answering: this rank cannot go on (exit code 4)."""


# What a collective raises when another process is gone or silent. gloo: its socket errors and
# timeouts. NCCL (with the error handling `nccl_error_handling` sets): the watchdog aborts the
# communicators on a timeout or a peer's network error, and the next collective raises
# "NCCL communicator was aborted"; a blocking wait (TORCH_NCCL_BLOCKING_WAIT=1) raises the timeout.
PEER_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Timed out",
    "gloo",
    "NCCL communicator was aborted",
    "Watchdog caught collective operation timeout",
    "timed out in blocking wait",
    "ncclRemoteError",
)
# NCCL errors of this process itself (two ranks on one GPU, a bad argument): not a peer's fault,
# so they keep their traceback.
LOCAL_NCCL_ERRORS = ("ncclInvalidUsage", "ncclInvalidArgument", "Duplicate GPU detected")


def is_peer_failure(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because of another process."""
    text = str(error)
    if any(m in text for m in LOCAL_NCCL_ERRORS):
        return False
    if isinstance(error, tdist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(m in text for m in PEER_MARKERS)


def nccl_error_handling(environ: MutableMapping[str, str] = os.environ) -> None:
    """Make a failed NCCL collective an exception in Python (exit code 4), not a killed process.

    By default (TORCH_NCCL_ASYNC_ERROR_HANDLING=3; torchrun exports 1) NCCL's watchdog thread
    tears the whole process down (SIGABRT, no message of ours) when a collective times out or a
    peer's connection fails. Mode 2 only aborts the NCCL communicators: the stuck kernel returns
    and the next collective raises DistBackendError ("NCCL communicator was aborted"), which
    gddist reports as a peer failure. Nothing that ran after the abort is saved: every checkpoint
    starts with a collective. Recent torch first gives a flight-recorder dump time
    (4 x TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC, a minute by default), so exit 4 comes about
    dist.timeout_s + 60 s after the hang; its heartbeat monitor would kill a process that has not
    shut the group down TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC later, and gddist closes it at once.
    Read by ProcessGroupNCCL when the group is created, so this runs before init_process_group.
    Left alone: an explicit 0 or 2, and TORCH_NCCL_BLOCKING_WAIT (which takes precedence in torch
    and raises the timeout from wait() itself).
    """
    if environ.get("TORCH_NCCL_BLOCKING_WAIT", "0").lower() in ("1", "true", "yes", "on"):
        return
    if environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING") in ("0", "2"):
        return
    environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "2"


class Dist:
    """This process's view of the group. World of one: no process group, collectives are no-ops."""

    def __init__(self, env: LaunchEnv, device: torch.device, backend: str | None) -> None:
        self.env = env
        self.rank = env.rank
        self.world_size = env.world_size
        self.local_rank = env.local_rank
        self.device = device
        self.backend = backend

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks in place and return it."""
        if self.distributed:
            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        return tensor

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(tensor).div_(self.world_size)

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on at least one: for control-flow decisions."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.all_reduce_sum(t).item() > 0)

    def max_async(self, values: Sequence[int]) -> Callable[[], list[int]]:
        """Start an all-reduce MAX of `values` (element by element); the returned function waits
        and gives the result, the same on every rank (MIN of some value: post its negation).
        Lets a rank keep training while the vote is in flight. World of one: `values`."""
        if not self.distributed:
            done = list(values)
            return lambda: done
        t = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        work = tdist.all_reduce(t, op=tdist.ReduceOp.MAX, async_op=True)

        def result() -> list[int]:
            work.wait()
            return t.tolist()

        return result

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (pickled between our own processes only)."""
        if not self.distributed:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def unresponsive_ranks(self, wait_s: float = 3.0) -> list[int] | None:
        """After a failed collective: the ranks that do not check in within `wait_s` (dead or
        hung), via the rendezvous store (torchrun's agent or the file store outlive a worker).
        None when the store itself cannot be reached."""
        tag = f"gddist/alive/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        try:
            store = tdist.distributed_c10d._get_default_store()
            store.set(f"{tag}/{self.rank}", "1")
            deadline = time.monotonic() + wait_s
            while True:
                missing = [r for r in range(self.world_size) if not store.check([f"{tag}/{r}"])]
                if not missing or time.monotonic() > deadline:
                    return missing
                time.sleep(0.1)
        except Exception:  # the store went down with its host rank
            return None

    def barrier(self) -> None:
        if self.distributed:
            tdist.barrier()

    def close(self) -> None:
        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()


def pick_device(kind: str, local_rank: int) -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("dist.device=cuda but CUDA is not available; use dist.device=auto")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init(cfg: DistConfig, env: LaunchEnv) -> Dist:
    """Pick device and backend and join the process group (only when world_size > 1)."""
    device = pick_device(cfg.device, env.local_rank)
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UserError("dist.backend=nccl needs CUDA devices; use dist.backend=gloo on CPU")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env.world_size > 1:
        if env.launcher == "slurm" and cfg.init_method == "env://":
            os.environ.setdefault("MASTER_ADDR", env.master_addr or "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(env.master_port))
        if backend == "nccl":
            nccl_error_handling()
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        store, _, _ = next(
            tdist.rendezvous(cfg.init_method, env.rank, env.world_size, timeout=timeout)
        )
        # torchrun's agent keeps ONE store across worker restarts (--max-restarts): without a
        # per-attempt prefix, restarted workers can read the dead workers' gloo addresses and hang.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        tdist.init_process_group(
            backend=backend,
            store=tdist.PrefixStore(f"gddist/attempt_{attempt}", store),
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
        )
    return Dist(env, device, backend if env.world_size > 1 else None)
