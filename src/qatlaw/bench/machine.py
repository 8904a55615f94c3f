"""The machine a benchmark ran on (``machine.parquet``) and its ``peak`` section.

``peak``
    fp32 matmul GFLOP/s of a large square ``torch.mm`` (n = 2048) at the benchmark's thread count: median and
    best of the repeats, measured before and again after the ``train`` section. ``frac_peak`` in ``train`` is
    relative to the best of all.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any

import numpy as np

from qatlaw.machine import cpu_model

PEAK_N = 2048


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, core counts, library versions and the load average (other processes skew every timing)."""
    import torch

    model = cpu_model()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": model, "logical_cpus": os.cpu_count(), "usable_cpus": affinity, "threads": threads,
        "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_avg_1m": os.getloadavg()[0],
    }


def matmul_peak(threads: int, n: int = PEAK_N, repeats: int = 5) -> dict[str, Any]:
    """fp32 GFLOP/s of an n×n by n×n torch.mm at ``threads`` threads: median and best of ``repeats``."""
    import torch

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    out = torch.empty(n, n)
    for _ in range(2):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t0)
    flops = 2.0 * n**3
    return {"n": n, "threads": threads, "repeats": repeats, "gflops": flops / statistics.median(times) / 1e9,
            "gflops_best": flops / min(times) / 1e9}
