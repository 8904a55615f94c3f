"""The command that starts a data-parallel run: torchrun on one node, or one torchrun per node under srun with
one rendezvous (the run's processes find each other through a c10d store on the job's first node); and the
relaunch of a training job under it."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import uuid

from qatlaw.errors import QatlawError
from qatlaw.stopping import Stopped, StopSignals

log = logging.getLogger("qatlaw")  # the qatlaw command's own log

# torchrun passes these on to its workers (SIGUSR1 too: SLURM's warning signal may be set to it)
SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def free_port() -> int:
    """A TCP port that is free on this host now."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def node_cpus(threads: int) -> int:
    """CPUs that this node's part of a training job has: inside a SLURM job those this process may run on (its
    allocation on the node, which ``--cpus-per-gpu`` may have made larger than ``threads``), else ``threads``."""
    if "SLURM_JOB_ID" in os.environ and hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return threads


def worker_threads(cpus: int, workers: int) -> int:
    """CPU threads of each of a node's ``workers`` processes that share its ``cpus`` CPUs (at least one)."""
    return max(1, cpus // max(1, workers))


def worker_env(cpus: int, workers: int) -> dict[str, str]:
    """Environment of a node's torchrun and its workers: OpenMP threads and inductor's compile pool sized to each
    worker's share of the node's CPUs, not one pool of the node's size per worker."""
    threads = str(worker_threads(cpus, workers))
    return {**os.environ, "OMP_NUM_THREADS": threads, "TORCHINDUCTOR_COMPILE_THREADS": threads}


def torchrun_command(gpus: int, nodes: int, argv: list[str], cpus: int, shutdown_s: int) -> list[str]:
    """The command that runs ``qatlaw`` with ``argv`` as ``gpus`` processes over ``nodes`` nodes, with ``cpus``
    CPUs per node.

    On one node: ``torchrun --standalone``. On several (inside a SLURM allocation of ``nodes`` nodes, from its
    first node): ``srun`` starts one torchrun per node with ``cpus`` CPUs (the batch step's settings do not pass on
    to a step started from it), and every torchrun joins the rendezvous that this host serves, named by the SLURM
    job (or a fresh id), so that a resumed run gets a new one. On a stop signal torchrun forwards it to its workers
    and gives them ``shutdown_s`` seconds to write their checkpoint before it kills them (the profile's signal lead
    time, not torchrun's default 30 s).
    """
    if nodes < 1 or gpus % nodes:
        raise QatlawError(f"--gpus {gpus} do not split over --nodes {nodes}")
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus // nodes}",
                f"--signals-to-handle={SIGNALS}", f"--shutdown-timeout={shutdown_s}"]
    program = ["-m", "qatlaw", *argv]
    if nodes == 1:
        return [*torchrun, "--standalone", *program]
    run_id = f"{os.environ.get('SLURM_JOB_ID', 'qatlaw')}-{uuid.uuid4().hex[:8]}"
    rendezvous = [f"--nnodes={nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={socket.gethostname()}:{free_port()}",
                  f"--rdzv-id={run_id}"]
    srun = ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", f"--cpus-per-task={cpus}",
            "--kill-on-bad-exit=1"]
    return [*srun, *torchrun, *rendezvous, *program]


def relaunch(argv: list[str], gpus: int, nodes: int, threads: int, stop_seconds: int, checkpoints: list[str]) -> None:
    """Run the ``qatlaw`` command ``argv`` again as ``gpus`` data-parallel processes over ``nodes`` nodes, each node's
    share of ``threads`` CPUs (:func:`node_cpus`) passed on as its workers' ``--threads``, and wait for it; a stop
    signal goes on to torchrun, which gives the workers ``stop_seconds`` to write their ``checkpoints``. Stopped
    when a stop signal ended it, QatlawError when it failed."""
    from qatlaw import runstate

    workers, cpus = max(1, gpus), node_cpus(threads)
    # the workers' --threads: the CPUs of their node, which they share
    command = torchrun_command(workers, nodes, [*argv, "--threads", str(cpus)], cpus, stop_seconds)
    log.info("data parallel over %d GPUs on %d node(s), %d CPU thread(s) each: %s", workers, nodes,
             worker_threads(cpus, workers // nodes), " ".join(command[:command.index("-m", 2)]))
    for checkpoint in checkpoints:
        runstate.stop_marker(checkpoint).unlink(missing_ok=True)
    torchrun = subprocess.Popen(command, env=worker_env(cpus, workers // nodes))
    with StopSignals(forward=torchrun.send_signal) as stop:
        returncode = torchrun.wait()
    # over several nodes SLURM signals the srun step, not this batch step: the workers' marker tells
    stopped = stop.received.name if stop.received else next(
        (f"a stop signal to its workers ({m.read_text().strip()})" for m in map(runstate.stop_marker, checkpoints)
         if m.is_file()), None)
    if returncode and stopped:
        raise Stopped(f"torchrun stopped on {stopped} (see the log above); rerun to resume")
    if returncode:
        raise QatlawError(f"torchrun with {gpus} processes on {nodes} node(s) failed (see the log above)")
