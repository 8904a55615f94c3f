"""The command that starts a data-parallel run: torchrun on one node, or one torchrun per node under srun with
one rendezvous (the run's processes find each other through a c10d store on the job's first node)."""

from __future__ import annotations

import os
import socket
import sys
import uuid

from qatlaw.errors import QatlawError

# torchrun passes these on to its workers (SIGUSR1 too: SLURM's warning signal may be set to it)
SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def free_port() -> int:
    """A TCP port that is free on this host now."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def torchrun_command(gpus: int, nodes: int, argv: list[str]) -> list[str]:
    """The command that runs ``qatlaw`` with ``argv`` as ``gpus`` processes over ``nodes`` nodes.

    On one node: ``torchrun --standalone``. On several (inside a SLURM allocation of ``nodes`` nodes, from its
    first node): ``srun`` starts one torchrun per node, and every torchrun joins the rendezvous that this host
    serves, named by the SLURM job (or a fresh id), so that a resumed run gets a new one.
    """
    if nodes < 1 or gpus % nodes:
        raise QatlawError(f"--gpus {gpus} do not split over --nodes {nodes}")
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus // nodes}",
                f"--signals-to-handle={SIGNALS}"]
    program = ["-m", "qatlaw", *argv]
    if nodes == 1:
        return [*torchrun, "--standalone", *program]
    run_id = f"{os.environ.get('SLURM_JOB_ID', 'qatlaw')}-{uuid.uuid4().hex[:8]}"
    rendezvous = [f"--nnodes={nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={socket.gethostname()}:{free_port()}",
                  f"--rdzv-id={run_id}"]
    srun = ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    return [*srun, *torchrun, *rendezvous, *program]
