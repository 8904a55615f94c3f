"""Benchmarks: matmul peak, training speed, quantization overhead, threads vs jobs, fits, pipeline, GPU check.

Run ``python -m qatlaw.bench`` from the repository root (``--quick`` for a short check, ``--help`` for options;
the command line is :mod:`qatlaw.bench.__main__`). It prints one Markdown table per section and writes each to
``results/bench/<section>.parquet`` (atomically), plus ``machine.parquet`` (CPU, cores, torch, load average)
and ``targets.parquet`` (each target as measured vs its bound, :mod:`qatlaw.bench.report`). Each section's
module docstring defines its columns: ``peak`` in :mod:`qatlaw.bench.machine`, ``train`` and ``concurrency`` in
:mod:`qatlaw.bench.train`, ``fit`` in :mod:`qatlaw.bench.fitspeed`, ``pipeline`` in
:mod:`qatlaw.bench.pipeline`, ``data`` in :mod:`qatlaw.bench.data`, ``gpu`` (the GPU path's check, also
``gpu.md``) in :mod:`qatlaw.bench.gpu`.
"""
