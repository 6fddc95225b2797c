"""Checkpoints, exact resume and fault tolerance (docs/architecture.md, invariants 2-5).

Every kill here comes from outside the training process (SIGKILL / SIGTERM / SIGINT sent by the
test), and every comparison is of real weights: bit-identical (torch.equal) where the world size
is unchanged, within 1e-5 across world sizes.
"""

import copy
import errno
import json
import logging
import os
import re
import signal
import threading
from pathlib import Path

import pytest
import torch
from helpers import (
    EXACT,
    assert_bit_identical,
    check,
    children,
    cli,
    cli_cmd,
    compose,
    environ_of,
    kill_all,
    last_step,
    load_model,
    max_weight_diff,
    rows,
    start,
    torchrun,
    torchrun_cmd,
    train,
    wait_until,
)

from gddist.checkpoint import Checkpointer, verify
from gddist.config import Config, UserError
from gddist.data import build as build_data
from gddist.dist import LaunchEnv, init
from gddist.trainer import Trainer

STEPS_PER_EPOCH = 800 // 64


def resumed_step(output: str) -> int:
    match = re.search(r"resumed from \S+ at step (\d+)", output)
    assert match, output[-3000:]
    return int(match.group(1))


@pytest.fixture(scope="module")
def uninterrupted_1(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted_1")
    train(run_dir, *EXACT)
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted_2(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted_2")
    check(torchrun(2, *EXACT, f"hydra.run.dir={run_dir}"))
    return run_dir


def kill_when(proc, run_dir, step, sig=signal.SIGKILL):
    wait_until(lambda: last_step(run_dir) >= step, 120, f"step {step}", proc)
    os.kill(proc.pid, sig)


# ----------------------------------------------------------------------------- 1 process


@pytest.mark.slow
def test_sigkill_mid_epoch_then_same_command_finishes_bit_identical(tmp_path, uninterrupted_1):
    run_dir = tmp_path / "b"
    args = [*EXACT, f"hydra.run.dir={run_dir}"]
    proc = start(cli_cmd(*args))
    kill_when(proc, run_dir, 150)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert last_step(run_dir) < 400  # really killed before the end
    again = check(cli(*args))
    step = resumed_step(again.stdout + again.stderr)
    assert step >= 140 and step % 35 == 0 and step % STEPS_PER_EPOCH != 0  # mid-epoch
    assert_bit_identical(load_model(uninterrupted_1), load_model(run_dir))
    # The log replays the same losses: one row per step, no duplicates from the killed run.
    losses = lambda d: [(r["step"], r["train/loss"]) for r in rows(d) if "train/loss" in r]  # noqa: E731
    assert losses(run_dir) == losses(uninterrupted_1)


@pytest.mark.slow
def test_ctrl_c_saves_exits_130_and_resumes_bit_identical(tmp_path, uninterrupted_1):
    run_dir = tmp_path / "c"
    args = [*EXACT, f"hydra.run.dir={run_dir}"]
    proc = start(cli_cmd(*args))
    kill_when(proc, run_dir, 60, sig=signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, out[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGINT" and not (run_dir / "model.pt").exists()
    saved = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    assert int(saved.name[5:]) == summary["step"]  # the stop step itself was checkpointed
    again = check(cli(*args))
    assert resumed_step(again.stdout + again.stderr) == summary["step"]
    assert_bit_identical(load_model(uninterrupted_1), load_model(run_dir))


def _starting_with_usr1_caught(pid):
    """The process catches SIGUSR1 and has not loaded torch yet (still importing)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(re.search(r"SigCgt:\s*([0-9a-f]+)", status).group(1), 16)
    torch_loaded = "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    return bool(caught >> (signal.SIGUSR1 - 1) & 1) and not torch_loaded


@pytest.mark.slow
def test_sigusr1_during_startup_is_kept_and_acted_on_at_the_first_step(tmp_path):
    """SLURM's preemption warning can land while train.py is still importing: the process must
    live (SIGUSR1's default action kills), then checkpoint at step 1 and exit like any stop."""
    run_dir = tmp_path / "r"
    proc = start(cli_cmd("trainer.max_steps=100000", f"hydra.run.dir={run_dir}"))
    wait_until(
        lambda: _starting_with_usr1_caught(proc.pid), 60, "startup with SIGUSR1 caught", proc
    )
    os.kill(proc.pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR1, out[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["stopped_by"], summary["step"]) == ("SIGUSR1", 1)
    verify(run_dir / "checkpoints" / "step_000000001")


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    # A model big enough that a save takes a while; kill while a .tmp-step_* dir exists.
    args = ["model=mlp", "model.hidden_sizes=[1024,1024]", "optimizer=adam",
            "trainer.max_steps=100", "trainer.eval_every=0", "trainer.log_every=10",
            "checkpoint.every_steps=20"]  # fmt: skip
    ckpts = tmp_path / "b" / "checkpoints"
    proc = start(cli_cmd(*args, f"hydra.run.dir={tmp_path / 'b'}"))
    in_write = lambda: any(ckpts.glob("step_*")) and any(ckpts.glob(".tmp-step_*"))  # noqa: E731
    wait_until(in_write, 120, "a checkpoint write after the first one", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    complete = sorted(ckpts.glob("step_*"))
    for path in complete:
        verify(path)  # every complete one is intact
    again = check(cli(*args, f"hydra.run.dir={tmp_path / 'b'}"))
    assert resumed_step(again.stdout + again.stderr) == int(complete[-1].name[5:])
    check(cli(*args, f"hydra.run.dir={tmp_path / 'a'}"))
    assert_bit_identical(load_model(tmp_path / "a"), load_model(tmp_path / "b"))


# ----------------------------------------------------------------------------- 2 processes


@pytest.mark.slow
def test_torchrun_restarts_a_sigkilled_worker_and_finishes_bit_identical(tmp_path, uninterrupted_2):
    run_dir = tmp_path / "b"
    proc = start(torchrun_cmd(2, *EXACT, f"hydra.run.dir={run_dir}", max_restarts=2))
    wait_until(lambda: last_step(run_dir) >= 120, 120, "step 120", proc)
    worker = children(proc.pid)[0]
    os.kill(worker, signal.SIGKILL)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]
    assert resumed_step(out) >= 105
    assert_bit_identical(load_model(uninterrupted_2), load_model(run_dir))


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_on_the_same_step(tmp_path, uninterrupted_2):
    run_dir = tmp_path / "b"
    args = [*EXACT, f"hydra.run.dir={run_dir}"]
    proc = start(torchrun_cmd(2, *args))
    wait_until(
        lambda: last_step(run_dir) >= 50 and len(children(proc.pid)) == 2, 120, "step 50", proc
    )
    rank1 = next(p for p in children(proc.pid) if environ_of(p).get("RANK") == "1")
    os.kill(rank1, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0  # stopped, not finished
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["step"] < 400
    stop = summary["step"]
    assert stop % 10 == 0  # an agreed stop-check step (trainer.stop_check_every=10)
    saved = run_dir / "checkpoints" / f"step_{stop:09d}"
    assert sorted(p.name for p in saved.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    again = torchrun(2, *args)
    check(again)
    assert resumed_step(again.stdout + again.stderr) == stop
    assert_bit_identical(load_model(uninterrupted_2), load_model(run_dir))


WORLD = ["model=mlp", "optimizer=adam", "trainer.log_every=5", "trainer.eval_every=0"]


@pytest.fixture(scope="module")
def uninterrupted_60(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted_60")
    train(run_dir, *WORLD, "trainer.max_steps=60")
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_continues_the_same_optimization(
    tmp_path, uninterrupted_60, first, then
):
    run_dir = tmp_path / "b"

    def run(nproc, steps):  # the single-process leg runs in this process: same code, faster
        args = [*WORLD, f"trainer.max_steps={steps}"]
        if nproc == 1:
            train(run_dir, *args)
        else:
            check(torchrun(nproc, *args, f"hydra.run.dir={run_dir}"))

    run(first, 30)
    run(then, 60)
    # Resumed, not restarted: one train row per logged step (a fresh start would log 5..60 again).
    assert [r["step"] for r in rows(run_dir) if "train/loss" in r] == list(range(5, 61, 5))
    state = torch.load(run_dir / "checkpoints" / "step_000000030" / "state.pt", weights_only=True)
    assert state["world_size"] == first
    assert max_weight_diff(load_model(uninterrupted_60), load_model(run_dir)) < 1e-5


def json_step(run_dir):
    return json.loads((run_dir / "summary.json").read_text())["step"]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["hang", "die"])
def test_a_rank_that_hangs_or_dies_ends_the_others_with_its_rank_named(tmp_path, fault):
    args = ["model=custom", "model._target_=models_for_tests.FaultyNet", f"+model.fault={fault}",
            "trainer.max_steps=50", "dist.timeout_s=5", f"dist.init_method=file://{tmp_path}/store",
            f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    procs = [start(cli_cmd(*args), RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r)) for r in (0, 1)]
    try:
        out, _ = procs[0].communicate(timeout=60)  # 5 s timeout + 3 s roll call + startup
        assert procs[0].returncode == 4, out[-3000:]
        assert "error: rank 0: rank(s) 1 died or did not answer within dist.timeout_s=5s" in out
        assert "Traceback" not in out
    finally:
        kill_all(procs)


# ----------------------------------------------------------------------------- in process


def make_trainer(run_dir, *overrides):
    cfg = Config.from_dict(compose(*overrides))
    return Trainer(cfg, build_data(cfg.data, cfg.seed), init(cfg.dist, LaunchEnv("none")), run_dir)


def test_checkpoint_holds_what_the_next_step_needs(tmp_path):
    train(
        tmp_path,
        "model=mlp",
        "scheduler=cosine",
        "trainer.max_steps=30",
        "checkpoint.every_steps=13",
    )
    path = tmp_path / "checkpoints" / "step_000000026"
    state = torch.load(path / "state.pt", weights_only=True)
    assert state["step"] == 26 and state["epoch"] == 2 and state["position_in_epoch"] == 2
    assert {"model", "optimizer", "scheduler", "config", "world_size", "tracker_run_id"} <= set(
        state
    )
    assert state["config"]["trainer"]["max_steps"] == 30 and state["world_size"] == 1
    rng = torch.load(path / "rank_00000.pt", weights_only=True)["rng"]
    assert {"torch", "numpy", "python"} <= set(rng)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_000000013",
        "step_000000026",
        "step_000000030",
    ]  # every 13 + the final save


def test_keep_last_keeps_the_newest_complete_ones(tmp_path):
    train(tmp_path, "trainer.max_steps=50", "checkpoint.every_steps=10", "checkpoint.keep_last=2")
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == [
        "step_000000040",
        "step_000000050",
    ]


def test_truncated_and_garbage_checkpoints_are_reported_and_skipped(tmp_path, caplog):
    train(tmp_path, "trainer.max_steps=60", "checkpoint.every_steps=20")
    ckpts = tmp_path / "checkpoints"
    state = ckpts / "step_000000060" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated
    rank = ckpts / "step_000000040" / "rank_00000.pt"
    rank.write_bytes(os.urandom(rank.stat().st_size))  # garbage of the right size
    with caplog.at_level(logging.WARNING, logger="gddist"):
        trainer = make_trainer(tmp_path, "trainer.max_steps=80", "checkpoint.every_steps=20")
    assert trainer.step == 20
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step_000000060: state.pt is truncated" in w for w in warnings), warnings
    assert any(
        "step_000000040: rank_00000.pt is corrupt (checksum mismatch)" in w for w in warnings
    )
    assert all("\n" not in w for w in warnings)


class Payload:  # an object torch.load(weights_only=True) must refuse to unpickle
    pass


def test_a_checkpoint_that_needs_pickled_code_is_refused(tmp_path):
    train(tmp_path, "trainer.max_steps=10", "checkpoint.every_steps=10")
    path = tmp_path / "checkpoints" / "step_000000010"
    torch.save({"model": Payload()}, path / "state.pt")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"].pop("state.pt")  # even with a manifest that does not cover it
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"state.pt needs pickled code to load and is refused"):
        make_trainer(tmp_path / "new", f"checkpoint.resume={path}")


def test_resume_refuses_a_changed_model_or_global_batch_unless_allowed(tmp_path):
    train(tmp_path, "model=mlp", "trainer.max_steps=10")
    with pytest.raises(
        UserError,
        match=r"cannot be resumed: its model differs at 'net.0.bias' \(checkpoint \(64,\), now \(32,\)\)",
    ):
        make_trainer(tmp_path, "model=mlp", "model.hidden_sizes=[32,64]", "trainer.max_steps=20")
    with pytest.raises(
        UserError, match=r"other settings \(data.batch_size: 64 -> 32\).*allow_changes=true"
    ):
        make_trainer(tmp_path, "model=mlp", "data.batch_size=32", "trainer.max_steps=20")
    trainer = make_trainer(tmp_path, "model=mlp", "data.batch_size=32", "trainer.max_steps=20",
                           "checkpoint.allow_changes=true")  # fmt: skip
    assert trainer.step == 10


def test_resume_never_and_explicit_path(tmp_path):
    train(tmp_path, "trainer.max_steps=20", "checkpoint.every_steps=10")
    assert make_trainer(tmp_path, "trainer.max_steps=30", "checkpoint.resume=never").step == 0
    # The fresh start archived the used run dir's history (tests/test_rundir.py has the rest).
    (archived,) = (tmp_path / "archive").iterdir()
    path = archived / "checkpoints" / "step_000000010"
    assert (
        make_trainer(tmp_path / "other", "trainer.max_steps=30", f"checkpoint.resume={path}").step
        == 10
    )
    with pytest.raises(
        UserError, match="checkpoint.resume=.*nope: .* is not a checkpoint directory"
    ):
        make_trainer(tmp_path, f"checkpoint.resume={tmp_path / 'nope'}")


def test_stop_signals_second_ctrl_c_exits_at_once():
    from gddist.signals import StopSignals

    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_save_is_collective_and_checkpointer_lists_only_complete_dirs(tmp_path):
    cfg = Config.from_dict(compose())
    ck = Checkpointer(cfg.checkpoint, tmp_path, init(cfg.dist, LaunchEnv("none")))
    (tmp_path / "checkpoints" / ".tmp-step_000000005").mkdir(parents=True)  # a crashed save
    assert ck.complete() == [] and ck.find_resume() is None
    ck.save(7, {"x": torch.ones(2)}, {"rng": {}})
    assert [p.name for p in ck.complete()] == ["step_000000007"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # leftovers pruned


# ----------------------------------------------------------------------------- async staging


def test_staging_reuses_its_buffers_while_the_tree_keeps_its_shape():
    from gddist import io
    from gddist.checkpoint import Staging
    from gddist.io import BLOCK, ZERO_COPY_MIN

    big = torch.randn(ZERO_COPY_MIN // 4 + 1000)  # float32, over the zero-copy threshold
    tree = {"w": big, "t": (torch.ones(3), [torch.arange(4).reshape(2, 2).t(), "x"]), "n": 7}
    staging = Staging()
    first = staging.snapshot(tree)
    assert torch.equal(first["w"], big) and first["w"].data_ptr() != big.data_ptr()
    if io._O_DIRECT:
        assert first["w"].data_ptr() % BLOCK == 0  # page-aligned: written to disk without a copy
    assert first["t"][1][0].stride() == (1, 2)  # strides kept, like a plain copy
    assert first["t"][1][1] == "x" and first["n"] == 7 and isinstance(first["t"], tuple)

    big.add_(1)  # training moves on
    second = staging.snapshot(tree)
    assert second["w"].data_ptr() == first["w"].data_ptr()  # the same buffer, refilled
    assert second["t"][0].data_ptr() == first["t"][0].data_ptr()
    assert torch.equal(second["w"], big)

    tree["w"] = torch.zeros(5)  # a changed shape gets a new buffer
    assert staging.snapshot(tree)["w"].data_ptr() != first["w"].data_ptr()


def test_reserved_staging_is_allocated_ahead_and_used_by_the_first_snapshot():
    from gddist.checkpoint import Staging
    from gddist.io import ZERO_COPY_MIN

    tree = {"w": torch.randn(ZERO_COPY_MIN // 4 + 1000), "b": [torch.ones(3)], "step": 4}
    staging = Staging()
    staging.reserve(tree)
    staging._join()  # the background allocation
    reserved = {path: buf.data_ptr() for path, (_, buf) in staging._buffers.items()}
    assert set(reserved) == {("w",), ("b", 0)}
    tree["w"].mul_(3)  # training goes on between reserve and the first save
    first = staging.snapshot(tree)
    assert (
        first["w"].data_ptr() == reserved[("w",)] and first["b"][0].data_ptr() == reserved[("b", 0)]
    )
    assert torch.equal(first["w"], tree["w"]) and first["step"] == 4


def test_trainer_reserves_async_staging_after_its_first_step(tmp_path):
    cfg = Config.from_dict(
        compose("model=mlp", "trainer.max_steps=3", "checkpoint.async=true", "logger.plots=false")
    )
    trainer = Trainer(
        cfg, build_data(cfg.data, cfg.seed), init(cfg.dist, LaunchEnv("none")), tmp_path
    )
    calls = []
    reserve = trainer.checkpointer.reserve
    trainer.checkpointer.reserve = lambda *a: (calls.append(trainer.step), reserve(*a))
    trainer.fit()
    assert calls == [1]  # once, after step 1: the optimizer state (momentum) exists by then
    verify(trainer.checkpointer.complete()[-1])


def test_async_save_writes_the_snapshot_of_its_step_and_waits_for_the_previous_write(
    tmp_path, monkeypatch
):
    from gddist import checkpoint

    # The background writes wait for a gate: training changes the live tensors while the
    # write of step 1 is still pending, and a second save must wait for that write (it would
    # otherwise refill the staging buffers the write still reads).
    gate = threading.Event()
    write = checkpoint.atomic_torch_save_hashed

    def gated_write(obj, path):
        assert gate.wait(60)
        return write(obj, path)

    monkeypatch.setattr(checkpoint, "atomic_torch_save_hashed", gated_write)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(600, 600), torch.nn.Linear(600, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def train_step():
        opt.zero_grad()
        model(torch.randn(8, 600)).square().mean().backward()
        opt.step()

    def state():
        return {"model": model.state_dict(), "optimizer": opt.state_dict()}

    def frozen():  # what the checkpoint of this step must hold
        return {k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(
            opt.state_dict()
        )

    cfg = Config.from_dict(compose("checkpoint.async=true")).checkpoint
    ck = Checkpointer(cfg, tmp_path, init(Config.from_dict(compose()).dist, LaunchEnv("none")))
    train_step()
    at_1 = frozen()
    ck.save(1, state(), {"rng": torch.get_rng_state()})  # returns with the write pending
    train_step()
    at_2 = frozen()
    second = threading.Thread(target=ck.save, args=(2, state(), {"rng": torch.get_rng_state()}))
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waiting for the write of step 1
    assert not ck.complete()
    gate.set()
    second.join(60)
    train_step()  # while step 2 may still be written
    ck.wait()
    assert [p.name for p in ck.complete()] == ["step_000000001", "step_000000002"]
    for path, (weights, opt_state) in zip(ck.complete(), (at_1, at_2), strict=True):
        verify(path)
        saved = torch.load(path / "state.pt", weights_only=True)
        assert_bit_identical(weights, saved["model"])
        assert saved["optimizer"]["param_groups"] == opt_state["param_groups"]
        for i, s in opt_state["state"].items():
            assert torch.equal(
                s["momentum_buffer"], saved["optimizer"]["state"][i]["momentum_buffer"]
            )
    assert not torch.equal(at_2[0]["0.weight"], model.state_dict()["0.weight"])  # it did move


@pytest.mark.parametrize("direct", ["o_direct", "refused_at_write", "no_o_direct"])
def test_hashed_save_reports_the_file_it_wrote_and_loads(tmp_path, monkeypatch, direct):
    import hashlib

    from torch.utils.serialization import config

    from gddist import io
    from gddist.io import aligned_empty_like, atomic_torch_save_hashed

    if direct != "o_direct" and not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this system: the plain case covers it")
    if direct == "no_o_direct":
        monkeypatch.setattr(io, "_O_DIRECT", 0)
    if direct == "refused_at_write":  # the flag is taken but the filesystem refuses its writes
        import fcntl

        pwrite = os.pwrite

        def refusing(fd, data, offset):
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", refusing)
    big = torch.randn(700, 900)
    staged = aligned_empty_like(big).copy_(big)  # page-aligned: the zero-copy path
    obj = {"big": staged, "odd": torch.arange(12345, dtype=torch.int16), "step": 3, "s": "x"}
    before = config.save.compute_crc32, config.save.storage_alignment
    info = atomic_torch_save_hashed(obj, tmp_path / "f.pt")
    data = (tmp_path / "f.pt").read_bytes()
    assert info == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    loaded = torch.load(tmp_path / "f.pt", weights_only=True)
    assert torch.equal(loaded["big"], big) and torch.equal(loaded["odd"], obj["odd"])
    assert loaded["step"] == 3 and loaded["s"] == "x"
    assert (config.save.compute_crc32, config.save.storage_alignment) == before  # restored
    assert [p.name for p in tmp_path.iterdir()] == ["f.pt"]  # no temporary file left
