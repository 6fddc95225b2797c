"""A real single-node SLURM cluster for tests: munged, slurmctld and slurmd, all in one temp dir.

Contract:
  - `SlurmCluster(root).start()` writes a munge key and a slurm.conf under `root`, starts munged,
    slurmctld and slurmd in the foreground of child processes (no systemd, no /etc files touched,
    nothing shared with a system SLURM or munge: own socket, own ports, own state dirs) and
    returns once the node `localhost` is idle. `stop()` cancels every job and ends the daemons.
  - `cluster.env(**extra)` is the environment for `sbatch`, `scontrol`, ... and for the jobs they
    start (sbatch exports the submitter's environment): SLURM_CONF points at the test cluster.
  - Every wait has a timeout and fails with the job's state and its log tail, never hangs.

Needs root (slurmd starts job steps as the submitting user) and Debian's packages
`slurmctld slurmd slurm-client munge`. `prerequisites_missing()` says what is absent;
`require_or_skip()` skips with that reason on a developer machine and fails under CI=true, where
the CI script installs the packages and the tests must prove the SLURM paths.

    python tests/slurm_cluster.py /tmp/slurm     # start one by hand; prints SLURM_CONF; Ctrl-C ends it
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

SBIN = ("/usr/sbin", "/sbin")  # the daemons live here; a non-login PATH may lack it
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
NODE = "localhost"  # resolves everywhere, so SLURM_JOB_NODELIST's head node is reachable
PARTITION = "debug"


def which(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    return shutil.which(name, path=path)


def prerequisites_missing() -> str | None:
    """Why a real SLURM cannot run here (None when it can)."""
    missing = [name for name in DAEMONS + CLIENTS if which(name) is None]
    if missing:
        return (
            f"SLURM/munge not installed (missing {', '.join(missing)}); "
            "apt-get install slurmctld slurmd slurm-client munge"
        )
    if os.geteuid() != 0:
        return "a local SLURM needs root (slurmd starts jobs as the submitting user)"
    return None


def require_or_skip(reason: str | None) -> None:
    """Skip with `reason` on a developer machine; under CI=true a missing prerequisite fails."""
    import pytest

    if reason is None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must run this test, but: {reason}", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A port the kernel just handed out (bind port 0); SLURM needs them in its config."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmError(AssertionError):
    """A SLURM command failed or a job did not reach the expected state in time."""


class SlurmCluster:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 60) -> SlurmCluster:
        self._write_files()
        munge_dir = self.socket.parent
        self._spawn(
            "munged",
            "--foreground",
            "--force",  # root-owned temp dirs and running as root are fine for a test daemon
            f"--socket={self.socket}",
            f"--key-file={munge_dir / 'munge.key'}",
            f"--pid-file={munge_dir / 'munged.pid'}",
            f"--log-file={munge_dir / 'munged.log'}",
            f"--seed-file={munge_dir / 'munged.seed'}",
        )
        self._wait(lambda: self.socket.exists(), timeout, "munged to open its socket")
        self._spawn("slurmctld", "-D", "-c", "-f", str(self.conf))
        self._wait(self._controller_up, timeout, "slurmctld to answer")
        self._spawn("slurmd", "-D", "-N", NODE, "-f", str(self.conf))
        self._wait(self._node_idle, timeout, f"node {NODE} to become idle")
        return self

    def stop(self, timeout: float = 30) -> None:
        """Cancel all jobs, then end slurmd, slurmctld and munged (in that order)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(
                [which("scancel"), "--full", "--partition", PARTITION],
                env=self.env(),
                capture_output=True,
                timeout=timeout,
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self._squeue("%i"):
                time.sleep(0.5)
        for name in reversed(list(self.procs)):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ commands

    def env(self, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        """`base` (default: this process's environment) without SLURM job variables, pointed at
        this cluster, plus `extra`."""
        env = {k: v for k, v in (base or os.environ).items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), *SBIN])
        env.update(extra)
        return env

    def run(self, *cmd: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        """Run a SLURM client command; its stdout, or SlurmError with its stderr."""
        proc = subprocess.run(
            [which(cmd[0]) or cmd[0], *cmd[1:]],
            env=env or self.env(),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} -> exit {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        """Submit; the job id."""
        return int(self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
        out = self.run("scontrol", "--oneliner", "show", "job", str(job_id))
        fields: dict[str, str] = {}
        for token in out.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait_job(
        self,
        job_id: int | str,
        until: Callable[[dict[str, str]], bool],
        timeout: float,
        what: str,
    ) -> dict[str, str]:
        """Poll the job until `until(fields)`; SlurmError with its state and log when the job
        ends first or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job_id)
            if until(fields):
                return fields
            ended = fields["JobState"] in END_STATES
            if ended or time.monotonic() > deadline:
                why = "before the job ended" if ended else f"after {timeout:.0f}s"
                raise SlurmError(
                    f"job {job_id}: no {what} {why}; state {fields.get('JobState')} "
                    f"({fields.get('Reason')}, exit {fields.get('ExitCode')})\n"
                    + self.job_log(fields)
                )
            time.sleep(0.3)

    def wait_done(self, job_id: int | str, timeout: float = 180) -> dict[str, str]:
        """Wait for the job to end; SlurmError (with its log) unless it COMPLETED."""
        fields = self.wait_job(
            job_id, lambda f: f["JobState"] in END_STATES, timeout, "end of the job"
        )
        if fields["JobState"] != "COMPLETED":
            raise SlurmError(
                f"job {job_id} ended {fields['JobState']} (exit {fields.get('ExitCode')})\n"
                + self.job_log(fields)
            )
        return fields

    def job_log(self, fields: dict[str, str], chars: int = 6000) -> str:
        path = Path(fields.get("StdOut", ""))
        text = path.read_text(errors="replace") if path.is_file() else f"(no log at {path})"
        return text[-chars:] + "\n--- slurmctld.log (tail)\n" + self.daemon_log("slurmctld")

    def daemon_log(self, name: str, chars: int = 3000) -> str:
        path = self.root / "log" / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    # ------------------------------------------------------------------ internals

    def _write_files(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses keys and dirs that others can read or write.
        self.socket.parent.chmod(0o700)
        key = self.socket.parent / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        cpus = max(2, os.cpu_count() or 1)
        log = self.root / "log"
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=gddisttest",
                    f"SlurmctldHost={NODE}",
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self.socket}",
                    # No cgroups in a container: track processes by parent pid, bind nothing.
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    "MpiDefault=none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "SchedulerType=sched/builtin",
                    "ReturnToService=2",
                    # Declared CPUs win over the probed hardware (a 1-core machine still runs 2 tasks).
                    "SlurmdParameters=config_overrides",
                    # After SIGTERM, steps get this long before SIGKILL (requeue, scancel, end).
                    "KillWait=30",
                    f"StateSaveLocation={self.root / 'state'}",
                    f"SlurmdSpoolDir={self.root / 'spool'}",
                    f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
                    f"SlurmdPidFile={self.root / 'slurmd.pid'}",
                    f"SlurmctldLogFile={log / 'slurmctld.log'}",
                    f"SlurmdLogFile={log / 'slurmd.log'}",
                    f"NodeName={NODE} CPUs={cpus} State=UNKNOWN",
                    f"PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    def _spawn(self, name: str, *args: str) -> None:
        out = open(self.root / "log" / f"{name}.out", "w")  # noqa: SIM115 (lives with the daemon)
        self.procs[name] = subprocess.Popen(
            [which(name), *args],
            env=self.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the test's terminal does not reach the daemons
        )

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(
                    f"--- {n}\n{(self.root / 'log' / f'{n}.out').read_text()[-2000:]}"
                    f"{self.daemon_log(n)}"
                    for n in self.procs
                )
                self.stop()
                raise SlurmError(f"waiting for {what}: daemons exited: {dead}\n{logs}")
            time.sleep(0.2)

    def _controller_up(self) -> bool:
        proc = subprocess.run(
            [which("scontrol"), "ping"], env=self.env(), capture_output=True, text=True, timeout=30
        )
        return proc.returncode == 0 and "UP" in proc.stdout

    def _node_idle(self) -> bool:
        proc = subprocess.run(
            [which("sinfo"), "--noheader", "--nodes", NODE, "--format=%T"],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        return proc.stdout.strip() == "idle"

    def _squeue(self, fmt: str) -> list[str]:
        proc = subprocess.run(
            [which("squeue"), "--noheader", f"--format={fmt}"],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        return proc.stdout.split()


END_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


if __name__ == "__main__":
    problem = prerequisites_missing()
    if problem:
        sys.exit(problem)
    # SIGTERM ends it like Ctrl-C: the daemons (own sessions) are stopped on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with SlurmCluster(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gddist-slurm")) as c:
        print(f"export SLURM_CONF={c.conf}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
