"""Tier 4: two "nodes" on one machine. Each node is a network namespace this test creates (joined by
a veth pair, addresses only inside the two namespaces); each runs its own `torchrun --nnodes=2`,
and the two meet through a c10d rendezvous across the link, as two machines of a cluster do.
Training must end with the weights of a plain single-process run.

Inside a fresh namespace the machine's hostname does not resolve to the node's address, so the
rendezvous host is told it hosts (`--rdzv-conf=is_host=1`), each node names its address
(`--local-addr`), and gloo is pinned to the veth (GLOO_SOCKET_IFNAME).

Needs root and iproute2; skipped with the reason otherwise, a failure under CI=true.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
from helpers import ROOT, clean_env, load_model, max_weight_diff, train
from slurm_cluster import require_or_skip

pytestmark = pytest.mark.slow

ARGS = ["model=mlp", "trainer.max_steps=30", "trainer.eval_every=0"]
SUBNET = "10.213.77"  # exists only inside the two namespaces below


def ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def namespaces_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed; apt-get install iproute2"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"gddist-probe-{os.getpid()}"
    try:
        ip("netns", "add", probe)
    except RuntimeError as e:
        return f"this machine forbids network namespaces: {e}"
    ip("netns", "del", probe)
    return None


@pytest.fixture
def two_nodes():
    """Two namespaces joined by a veth pair: [(namespace, interface, address), ...]."""
    require_or_skip(namespaces_unavailable())
    tag = uuid.uuid4().hex[:6]
    nodes = [(f"gddist-{tag}-{i}", f"veth{i}", f"{SUBNET}.{i + 1}") for i in range(2)]
    (ns0, if0, _), (ns1, if1, _) = nodes
    try:
        for ns, _, _ in nodes:
            ip("netns", "add", ns)
        ip("link", "add", if0, "netns", ns0, "type", "veth", "peer", "name", if1, "netns", ns1)
        for ns, iface, addr in nodes:
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", iface)
            ip("-n", ns, "link", "set", iface, "up")
            ip("-n", ns, "link", "set", "lo", "up")  # each node's workers talk to their agent
        yield nodes
    finally:
        for ns, _, _ in nodes:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def free_port_in(namespace: str) -> int:
    """A port the kernel hands out inside `namespace` (nothing else runs in it to take it)."""
    code = "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"
    out = subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return int(out.stdout)


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Exit codes; None for a process still running after `timeout` s (then killed, with its
    process group)."""
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            codes.append(None)
    return codes


def test_two_nodes_in_network_namespaces_train_like_one_process(two_nodes, tmp_path):
    train(tmp_path / "one", *ARGS)
    host_addr = two_nodes[0][2]
    endpoint = f"{host_addr}:{free_port_in(two_nodes[0][0])}"
    procs = []
    for node_rank, (ns, iface, addr) in enumerate(two_nodes):
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run"]
        cmd += ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d"]
        cmd += [f"--rdzv-endpoint={endpoint}", "--rdzv-id=two-nodes", "--max-restarts=0"]
        cmd += [f"--rdzv-conf=is_host={int(node_rank == 0)},join_timeout=60"]
        cmd += [f"--local-addr={addr}", str(ROOT / "train.py"), *ARGS]
        log = open(tmp_path / f"node{node_rank}.log", "w")  # noqa: SIM115 (closed below)
        env = clean_env(GLOO_SOCKET_IFNAME=iface)
        # Own process group: on a timeout the agent and its workers are killed together.
        procs.append(
            subprocess.Popen(
                cmd, cwd=tmp_path, env=env, stdout=log, stderr=log, start_new_session=True
            )
        )
        log.close()
    codes = wait_all(procs, timeout=180)
    logs = "\n".join((tmp_path / f"node{i}.log").read_text()[-3000:] for i in range(2))
    assert codes == [0, 0], logs
    # Both nodes derived the same run dir from the config's identity; rank 0 wrote it.
    (run_dir,) = (tmp_path / "outputs").iterdir()
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    assert json.loads((newest / "manifest.json").read_text())["world_size"] == 2
    assert max_weight_diff(load_model(run_dir), load_model(tmp_path / "one")) < 1e-5
