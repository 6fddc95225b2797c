"""How the model is wrapped, run in mixed precision, and how its gradients are synced and clipped.

An engine is the small seam between the training loop and the distributed machinery:

    engine.model                  what forward runs on (DDP / Accelerate-wrapped / compiled)
    engine.module                 the plain nn.Module (state_dict keys without module./_orig_mod.)
    engine.prepare_optimizer(o)   the optimizer the loop steps
    engine.sync_context(sync)     all-reduce gradients on this backward only when `sync`
    engine.autocast()             mixed-precision context for forward + loss
    engine.backward(loss)         (scaled) backward
    engine.clip_gradients(o, n, v, measure) -> global grad norm (device tensor; None if unneeded)
    engine.step(o)                optimizer step (through the fp16 GradScaler when there is one)
    engine.state_dict() / load_state_dict()   the GradScaler's state, for checkpoints

`ddp` wraps the model in DistributedDataParallel itself (gradient_as_bucket_view: gradients live in
DDP's buckets, no extra copy; `engine.find_unused_parameters` is DDP's own flag, and the error DDP
raises without it becomes one line naming the parameters and the key). `accelerate` runs the same
loop through `accelerate.Accelerator`, so its launcher and plugins can be used (the flag reaches
its DDP through DistributedDataParallelKwargs). Micro-batches before the last one of an optimizer
step run without gradient sync, so gradients are all-reduced once per optimizer step. With
`model.sync_batchnorm=true` and N > 1 processes the model's BatchNorm layers become SyncBatchNorm
first (gddist/batchnorm.py), in both engines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gddist import batchnorm
from gddist.config import Config, UserError
from gddist.dist import Dist, LaunchEnv

log = logging.getLogger("gddist")

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
Compiler = Callable[[nn.Module], nn.Module]


def check_precision(precision: str, device: torch.device) -> None:
    """fp16 needs CUDA: it only trains with a GradScaler, which is a CUDA feature here."""
    if precision == "fp16" and device.type != "cuda":
        raise UserError(
            "trainer.precision=fp16 needs a CUDA device (fp16 autocast with a GradScaler); "
            "use trainer.precision=bf16 on CPU"
        )


def build(cfg: Config, model: nn.Module, dist: Dist) -> DDPEngine | AccelerateEngine:
    """The engine named by cfg.engine (precision was checked by `check_precision` already)."""
    model = sync_batchnorm(model, cfg.model.sync_batchnorm, dist)
    unused = cfg.engine.find_unused_parameters
    if cfg.engine.name == "accelerate":
        return AccelerateEngine(model, dist, cfg.trainer.precision, _compiler(cfg), unused)
    return DDPEngine(model, dist, cfg.trainer.precision, _compiler(cfg), unused)


def sync_batchnorm(model: nn.Module, wanted: bool, dist: Dist) -> nn.Module:
    """`model.sync_batchnorm=true`: the model with its BatchNorm layers normalizing over the
    global batch when N > 1 processes train it (gddist/batchnorm.py); its parameters and buffers
    are the same tensors. A world of one keeps plain BatchNorm: its batch is the global batch
    already, so the math is the same."""
    if not wanted:
        return model
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        if dist.is_main:
            log.warning("model.sync_batchnorm=true, but the model has no BatchNorm layer")
        return model
    if not dist.distributed:
        return model
    model, layers = batchnorm.convert(model, dist.device)
    if dist.is_main:
        log.info(
            "model.sync_batchnorm: %d BatchNorm layer(s) normalize over the global batch of %d "
            "processes",
            layers,
            dist.world_size,
        )
    return model


def _compiler(cfg: Config) -> Compiler | None:
    if not cfg.trainer.compile:
        return None
    return lambda m: torch.compile(m, backend=cfg.trainer.compile_backend)


def _grad_norm(
    params: list[nn.Parameter], clip_norm: float | None, clip_value: float | None, measure: bool
) -> torch.Tensor | None:
    """Clip (value, then norm) gradients that are already all-reduced and unscaled; return the
    global norm before norm clipping, or None when neither norm clipping nor `measure` needs it
    (the norm is a pass over every gradient: the hot path skips it on steps that do not log).
    Every rank holds the same gradients, so every rank computes the same norm: a non-finite norm
    is a decision all ranks share without another collective."""
    if clip_norm is None and clip_value is None and not measure:
        return None
    params = [p for p in params if p.grad is not None]
    if clip_value is not None:
        torch.nn.utils.clip_grad_value_(params, clip_value)
    if clip_norm is None and not measure:
        return None
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if clip_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, clip_norm, norm)
    return norm


UNUSED_ERROR = "Expected to have finished reduction in the prior iteration"


def unused_parameters_message(module: nn.Module, error: str) -> str:
    """DDP's error for parameters that got no gradient, as one line naming them (DDP's
    message gives their indices among the module's parameters that require a gradient)."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    found = re.search(r"did not receive grad for rank (\d+): ([\d ]+)", error)
    which = ""
    if found:
        picked = [names[int(i)] for i in found.group(2).split() if int(i) < len(names)]
        which = f" ({', '.join(picked)} on rank {found.group(1)})"
    return (
        f"the model has parameters that got no gradient at the previous step{which}, so DDP "
        "could not all-reduce them; pass engine.find_unused_parameters=true (DDP then finds them "
        "at each step), or make every parameter take part in the loss"
    )


class _HintingDDP(DistributedDataParallel):
    """DDP whose unused-parameters error is a UserError (one line, exit 2), not a traceback."""

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        try:
            return super().forward(*inputs, **kwargs)
        except RuntimeError as e:
            if UNUSED_ERROR not in str(e):
                raise
            raise UserError(unused_parameters_message(self.module, str(e))) from None


class DDPEngine:
    """The native engine: DDP (world > 1), torch.autocast, a CUDA GradScaler for fp16."""

    def __init__(
        self,
        model: nn.Module,
        dist: Dist,
        precision: str,
        compiler: Compiler | None,
        find_unused_parameters: bool = False,
    ) -> None:
        self.module = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        wrapped = model
        if dist.distributed:
            device_ids = [dist.device.index] if dist.device.type == "cuda" else None
            # torch.compile gets DDP itself (its DDP-aware graph splitting); eager runs the hint.
            ddp = DistributedDataParallel if compiler else _HintingDDP
            wrapped = ddp(
                model,
                device_ids=device_ids,
                gradient_as_bucket_view=True,
                find_unused_parameters=find_unused_parameters,
            )
        self._ddp = wrapped if dist.distributed else None
        # Compile the wrapper (DDP-aware graph breaks); checkpoints use the plain `module`.
        self.model: nn.Module = compiler(wrapped) if compiler else wrapped
        self.device_type = dist.device.type
        self.dtype = DTYPES[precision]
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    @property
    def skips_nonfinite_steps(self) -> bool:
        """With a GradScaler, an overflowing step is skipped by design: not a divergence."""
        return self.scaler is not None

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer

    def sync_context(self, sync: bool) -> contextlib.AbstractContextManager:
        if sync or self._ddp is None:
            return contextlib.nullcontext()
        return self._ddp.no_sync()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def clip_gradients(
        self,
        optimizer: torch.optim.Optimizer,
        clip_norm: float | None,
        clip_value: float | None,
        measure: bool,
    ) -> torch.Tensor | None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)  # clip and measure true gradients
        return _grad_norm(self.params, clip_norm, clip_value, measure)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


@contextlib.contextmanager
def torchrun_style_env(env: LaunchEnv) -> Iterator[None]:
    """Within the block, the process's place in the job as torchrun would export it (RANK,
    WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), whatever launched it.

    Accelerate's PartialState recognizes a distributed run by these variables only: under srun
    (SLURM_* only) it would see a world of one, wrap nothing in DDP and never sync gradients, each
    rank training on its own. A world of one is left alone (exporting LOCAL_RANK would make
    Accelerate start a process group of its own on CUDA). The previous values come back on exit,
    so a later detect_launch() still sees the real launcher.
    """
    if env.world_size <= 1:
        yield
        return
    wanted = {
        "RANK": env.rank,
        "WORLD_SIZE": env.world_size,
        "LOCAL_RANK": env.local_rank,
        "LOCAL_WORLD_SIZE": env.local_world_size,
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": env.master_port,
    }
    # The group is already joined: MASTER_* only keep Accelerate's sanity checks quiet, so a
    # launcher's own values win over ours.
    keep = ("MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in wanted}
    try:
        for key, value in wanted.items():
            if value is not None and not (key in keep and os.environ.get(key)):
                os.environ[key] = str(value)
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def check_accelerate_world(accelerator: Any, dist: Dist) -> None:
    """Accelerate must see the process group gddist joined, else ranks would train apart."""
    seen = (accelerator.process_index, accelerator.num_processes)
    if seen != (dist.rank, dist.world_size):
        raise UserError(
            f"engine=accelerate: Accelerate sees process {seen[0]} of {seen[1]}, but the "
            f"launcher ({dist.env.launcher}) started rank {dist.rank} of {dist.world_size}; "
            "unset ACCELERATE_* variables that disagree with the launch, or use engine=ddp"
        )


class AccelerateEngine:
    """The same seam through `accelerate.Accelerator` (prepare, backward, clip, no_sync,
    autocast). gddist has already joined the process group; Accelerate reuses it, and is shown
    the launch as torchrun exports it (torchrun_style_env), so it sees the same ranks under any
    launcher (torchrun, srun, submitit)."""

    def __init__(
        self,
        model: nn.Module,
        dist: Dist,
        precision: str,
        compiler: Compiler | None,
        find_unused_parameters: bool = False,
    ) -> None:
        from accelerate import Accelerator  # lazy: a second of imports
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedDataParallelKwargs

        AcceleratorState._reset_state(True)  # one Accelerator per run, also for runs in-process
        mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
        # Accelerate builds the DDP wrapper itself: DDP's flags reach it through this handler.
        ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
        with torchrun_style_env(dist.env):
            self.accelerator = Accelerator(
                cpu=dist.device.type == "cpu", mixed_precision=mixed, kwargs_handlers=[ddp_kwargs]
            )
        check_accelerate_world(self.accelerator, dist)
        self.module = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.model = self.accelerator.prepare_model(model, device_placement=False)
        if compiler:
            self.model = compiler(self.model)

    @property
    def skips_nonfinite_steps(self) -> bool:
        return self.accelerator.scaler is not None

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return self.accelerator.prepare_optimizer(optimizer, device_placement=False)

    def sync_context(self, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model)

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_gradients(
        self,
        optimizer: torch.optim.Optimizer,
        clip_norm: float | None,
        clip_value: float | None,
        measure: bool,
    ) -> torch.Tensor | None:
        if clip_norm is not None and clip_value is None:
            params = [p for p in self.params if p.grad is not None]
            return self.accelerator.clip_grad_norm_(params, clip_norm)
        self.accelerator.unscale_gradients()  # a no-op without an fp16 scaler
        return _grad_norm(self.params, clip_norm, clip_value, measure)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()  # an AcceleratedOptimizer: steps through the scaler when there is one

    def state_dict(self) -> dict[str, Any]:
        scaler = self.accelerator.scaler
        return {"scaler": scaler.state_dict()} if scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.accelerator.scaler is not None and "scaler" in state:
            self.accelerator.scaler.load_state_dict(state["scaler"])
