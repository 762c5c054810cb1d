"""A real single-node SLURM cluster on 127.0.0.1 (Debian's slurmctld, slurmd, munge), started and stopped by the
test, runs the tiny pipeline through `snakemake --profile slurm` from the project root, as a user types it.

The cluster has the profile's partitions (cpu, gpu: the same node), no accounting database (hence the profile's
`slurm-status-command: squeue`) and its own munge key and socket, so it touches nothing system-wide. Without the
SLURM packages or root the test is skipped, except in CI (CI=true), where it fails.
"""
from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from workflow_util import BIN, env, outputs, project_copy

DAEMONS = ("munged", "slurmctld", "slurmd")


def need(condition: bool, why: str) -> None:
    if not condition:
        if os.environ.get("CI") == "true":
            pytest.fail(f"SLURM test cannot run in CI: {why} (.ci/setup installs slurmctld slurmd munge as root)")
        pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(d: Path, node_line: str) -> str:
    """One node on 127.0.0.1 with the profile's partitions; memory is not a consumable resource and the node
    reports the configured size (config_overrides), so the profile's per-rule requests fit."""
    node = node_line.split()[0].split("=", 1)[1]
    fields = [f for f in node_line.split() if not f.startswith(("RealMemory=", "UpTime="))]
    return f"""\
ClusterName=epdtest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=300
SlurmdParameters=config_overrides
{" ".join(fields)} RealMemory=64000 NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=cpu Nodes={node} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={node} MaxTime=INFINITE State=UP
"""


@pytest.fixture
def cluster(tmp_path_factory):
    """Start munged, slurmctld and slurmd in a private folder; yield the environment that reaches them; stop the
    daemons by PID."""
    tools = [shutil.which(t) or shutil.which(t, path="/usr/sbin:/usr/bin") for t in (*DAEMONS, "mungekey")]
    need(all(tools) and shutil.which("srun"), "SLURM/munge not installed (Debian: slurmctld slurmd slurm-client munge)")
    need(os.geteuid() == 0, "the test cluster runs its daemons as root")
    munged, slurmctld, slurmd, mungekey = tools
    d = tmp_path_factory.mktemp("slurm")
    d.chmod(0o700)
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    node_line = subprocess.run([slurmd, "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    (d / "slurm.conf").write_text(slurm_conf(d, node_line))
    subprocess.run([mungekey, "--create", f"--keyfile={d}/munge.key"], check=True, capture_output=True)
    # The slurm-jobstep plugin runs each job's command through `srun` with every SLURM_* variable removed, so
    # srun would look for /etc/slurm/slurm.conf; a wrapper first on PATH (exported to jobs) points it at ours.
    (d / "bin").mkdir()
    srun = d / "bin" / "srun"
    srun.write_text(f'#!/bin/sh\nSLURM_CONF={d}/slurm.conf exec {shutil.which("srun")} "$@"\n')
    srun.chmod(0o755)
    e = env(SLURM_CONF=str(d / "slurm.conf"))
    e["PATH"] = f"{d / 'bin'}{os.pathsep}{e['PATH']}"
    procs = []
    try:
        procs.append(subprocess.Popen(
            [munged, "--foreground", "--force", f"--socket={d}/munge.socket", f"--key-file={d}/munge.key",
             f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"],
            env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait(lambda: (d / "munge.socket").exists(), "munged socket", d)
        node = node_line.split()[0].split("=", 1)[1]
        procs.append(subprocess.Popen([slurmctld, "-D", "-c", "-i"], env=e, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen([slurmd, "-D", "-N", node], env=e, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        _wait(lambda: subprocess.run(["sinfo", "-h", "-o", "%t"], env=e, capture_output=True,
                                     text=True).stdout.split()[:1] == ["idle"], "an idle node", d)
        yield e
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _wait(ready, what: str, d: Path, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > end:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(d.glob("*.log")))
            raise RuntimeError(f"test cluster: no {what} after {timeout} s\n{logs}")
        time.sleep(0.5)


def test_tiny_pipeline_on_slurm(cluster, tmp_path):
    root = project_copy(tmp_path)
    out = subprocess.run(
        [str(BIN / "snakemake"), "--profile", "slurm",
         # the test cluster has no accounts; and its jobs are seconds long, so poll often
         "--slurm-no-account", "--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "5"],
        cwd=root, env=cluster, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-6000:]
    jobs = subprocess.run(["squeue", "-h", "--states=all", "-o", "%j|%T|%P"], env=cluster, capture_output=True,
                          text=True, check=True).stdout.split()
    # every non-local rule ran as a SLURM job, and every one completed: 1 teacher, distill, ld3, rdpo, 4 samples and
    # the reference, 5 evals
    assert len(jobs) == 14 and all(j.split("|")[1] == "COMPLETED" for j in jobs), jobs
    assert {j.split("|")[2] for j in jobs} == {"gpu"}  # the profile's per-rule partition
    with (root / "results" / "tiny" / "report" / "summary.csv").open() as f:
        assert [(r["solver"], r["nfe"]) for r in csv.DictReader(f)] == [("epd", "3"), ("rdpo", "3"), ("ld3", "3"),
                                                                        ("euler", "3"), ("reference", "")]
    before = outputs(root)
    again = subprocess.run([str(BIN / "snakemake"), "--profile", "slurm", "--slurm-no-account", "-n"],
                           cwd=root, env=cluster, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert "Nothing to be done" in again.stdout and outputs(root) == before
