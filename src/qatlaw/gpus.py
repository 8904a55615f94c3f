"""Which GPUs a training job uses when several run at once on one machine with no batch system.

Snakemake caps how many GPUs its jobs use together (``--resources gpu=N``) but does not say which: left alone,
every job would train on ``cuda:0``. So a job takes a lease on as many GPUs as it needs: one lock file per GPU
(``fcntl.flock``, released by the kernel when the job's process ends, however it ends), and
``CUDA_VISIBLE_DEVICES`` names the leased ones for the job and its ``torchrun`` workers. Where the GPUs are
already assigned (SLURM, or a user's own ``CUDA_VISIBLE_DEVICES``) nothing is leased.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from pathlib import Path

from qatlaw.errors import QatlawError

LOCK_DIR = Path(tempfile.gettempdir()) / "qatlaw-gpu-locks"
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one entry per GPU the driver sees, read without starting CUDA

log = logging.getLogger("qatlaw")  # the qatlaw command's own log


class GpuError(QatlawError):
    """The GPUs a job needs cannot be leased."""


class Lease:
    """GPUs held by this process until :meth:`release` or its end."""

    def __init__(self, ids: list[int], fds: list[int]):
        self.ids, self._fds = ids, fds

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def lease(n: int, count: int, lock_dir: Path = LOCK_DIR) -> Lease:
    """The first ``n`` of ``count`` GPUs that no other job holds, locked for this process; GpuError when fewer
    are free (more GPU jobs at once than GPUs: give Snakemake ``--resources gpu=<count>``)."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    ids: list[int] = []
    fds: list[int] = []
    for i in range(count):
        if len(ids) == n:
            break
        fd = os.open(lock_dir / f"gpu{i}.lock", os.O_RDWR | os.O_CREAT)  # held open: the lock lives with it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        ids.append(i)
        fds.append(fd)
    if len(ids) < n:
        Lease(ids, fds).release()
        raise GpuError(f"this job needs {n} GPU(s) but only {len(ids)} of the machine's {count} are free (other "
                       f"jobs hold the rest): run Snakemake with --resources gpu={count} so that no more GPU jobs "
                       "start than there are GPUs")
    return Lease(ids, fds)


def assign(n: int, count: int, lock_dir: Path = LOCK_DIR) -> Lease | None:
    """Lease ``n`` GPUs and make them this process's (and its children's) ``CUDA_VISIBLE_DEVICES``, unless a
    batch system or the user already chose them, or the machine has no GPU (then None). The GPUs are
    free again when the lease is released or the process ends."""
    if n < 1 or count < 1 or "CUDA_VISIBLE_DEVICES" in os.environ or "SLURM_JOB_ID" in os.environ:
        return None
    held = lease(n, count, lock_dir)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in held.ids)
    return held


def machine_gpus() -> int:
    """NVIDIA GPUs in this machine, counted from the driver's entries: torch would start CUDA to count them,
    after which CUDA_VISIBLE_DEVICES no longer applies to this process."""
    return len(list(NVIDIA_GPUS.iterdir())) if NVIDIA_GPUS.is_dir() else 0


def lease_for_job(count: int) -> None:
    """This job's own ``count`` GPUs (none where SLURM or the user chose them), named in CUDA_VISIBLE_DEVICES for
    it and its workers."""
    if assign(count, machine_gpus()):
        log.info("GPUs %s leased for this job (CUDA_VISIBLE_DEVICES)", os.environ["CUDA_VISIBLE_DEVICES"])


def lease_for_device(device: str) -> None:
    """On ``cuda``, this job's own GPU, before torch starts CUDA."""
    if device == "cuda":
        lease_for_job(1)
