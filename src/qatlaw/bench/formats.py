"""The ``formats`` section of the benchmark: what the 4-bit formats cost beside INT4.

``quant``
    Fake-quantization throughput of one tensor (the activations of one layer: batch × sequence tokens × hidden,
    and one weight matrix) in every format against INT4 AbsMax at the same block size: INT4 G 32 and G 16,
    FP4 (E2M1, fp32 scale) G 32, MXFP4 (block 32), MXFP4 after a Hadamard rotation of 32, NVFP4 (block 16).
    Timed interleaved, one thread, ``repeats`` samples of process CPU time; ``melem_per_s`` from the median,
    ``ratio`` = the median over samples of the format's time / the same sample's INT4 time at its block size.
``train``
    The training-step overhead of each format against the unquantized step (FP32 "BF16" in the grid), through
    :func:`qatlaw.bench.train.measure_training`: the same interleaved steps and CPU-time ratios as the ``train``
    section, for W4A4 in each format.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import pandas as pd

# (label, precision, block size, format, rotation) of the fake-quantization cases; the INT4 reference of a case is
# the int case of its block size
QUANT_CASES = (
    ("INT4", "W4A4", 32, "int", None),
    ("INT4", "W4A4", 16, "int", None),
    ("FP4", "W4A4", 32, "fp4", None),
    ("MXFP4", "W4A4-mxfp4", 32, "mxfp4", None),
    ("MXFP4 + Hadamard 32", "W4A4-mxfp4-had32", 32, "mxfp4", 32),
    ("NVFP4", "W4A4-nvfp4", 16, "nvfp4", None),
)
TRAIN_VARIANTS = (("BF16", None), ("W4A4", 32), ("W4A4", 16), ("W4A4-mxfp4", 32), ("W4A4-mxfp4-had32", 32),
                  ("W4A4-nvfp4", 16))


def measure_quant(shapes: dict[str, tuple[int, int]], *, threads: int = 1, repeats: int = 9,
                  log: Callable[[str], None] = print) -> pd.DataFrame:
    """Fake-quantization throughput per tensor × format (the module docstring); one row each."""
    import torch

    from qatlaw.quant import fake_quant, rotate

    torch.set_num_threads(threads)
    rows = []
    for tensor, shape in shapes.items():
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))

        def run(case: tuple, x: torch.Tensor = x) -> None:
            _, _, block, fmt, rotation = case
            fake_quant(x if rotation is None else rotate(x, rotation), 4, block, fmt=fmt)

        times: list[list[float]] = [[] for _ in QUANT_CASES]
        for case in QUANT_CASES:  # warm-up
            run(case)
        for r in range(repeats):
            order = range(len(QUANT_CASES)) if r % 2 == 0 else reversed(range(len(QUANT_CASES)))
            for i in order:
                c0 = time.process_time()
                for _ in range(5):
                    run(QUANT_CASES[i])
                times[i].append((time.process_time() - c0) / 5)
        for i, (label, precision, block, fmt, rotation) in enumerate(QUANT_CASES):
            ref = next(j for j, c in enumerate(QUANT_CASES) if c[3] == "int" and c[2] == block)
            median = statistics.median(times[i])
            rows.append({"tensor": tensor, "shape": "x".join(map(str, shape)), "format": label,
                         "precision": precision, "block": block, "ms": 1e3 * median,
                         "melem_per_s": x.numel() / median / 1e6,
                         "ratio": statistics.median(a / b for a, b in zip(times[i], times[ref], strict=True)),
                         "versus": f"INT4 G{block}", "threads": threads, "repeats": repeats})
            log(f"  {tensor} {label:20s} block {block:2d} {1e3 * median:7.2f} ms {rows[-1]['melem_per_s']:7.1f} "
                f"Melem/s ratio {rows[-1]['ratio']:.2f} vs INT4 G{block}")
    return pd.DataFrame(rows)


def measure_formats(cfg: dict, sizes: Sequence[str], *, threads: int = 1, modes: Sequence[str] = ("eager",),
                    compile_sizes: Sequence[str] | None = None, repeats: int = 9, warmup: int = 2,
                    log: Callable[[str], None] = print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(fake-quantization throughput, training-step overhead) of the formats: the module docstring's tables."""
    from qatlaw.bench.train import measure_training

    size = cfg["models"][sizes[-1]]
    batch = size.get("batch_size", cfg["training"]["batch_size"])
    shapes = {"activation": (batch * cfg["training"]["seq_len"], size["hidden"]),
              "weight": (size["ffn"], size["hidden"])}
    quant = measure_quant(shapes, threads=threads, repeats=repeats, log=log)
    train = measure_training(cfg, sizes, threads=threads, modes=modes, compile_sizes=compile_sizes,
                             variants=TRAIN_VARIANTS, repeats=repeats, warmup=warmup, log=log)
    return quant, train
