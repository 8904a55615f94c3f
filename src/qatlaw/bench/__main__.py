"""The benchmark's command line, ``python -m qatlaw.bench`` (sections and tables: :mod:`qatlaw.bench`)."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

import qatlaw.bench
from qatlaw.bench.data import DATA_CORPUS_TOKENS, measure_data
from qatlaw.bench.fitspeed import measure_fits
from qatlaw.bench.formats import measure_formats
from qatlaw.bench.gpu import BUDGET_S, PAPER_VOCAB, gpu_markdown, gpu_worker, measure_gpu
from qatlaw.bench.inputs import measure_input
from qatlaw.bench.machine import PEAK_N, machine_info, matmul_peak
from qatlaw.bench.pipeline import pipeline_overhead, read_wall_seconds
from qatlaw.bench.report import markdown, targets
from qatlaw.bench.train import (
    DEFAULT_SIZES,
    MODES,
    concurrency_worker,
    measure_concurrency,
    measure_numerics,
    measure_training,
)

SECTIONS = ("peak", "train", "numerics", "formats", "concurrency", "fit", "pipeline", "data", "input", "gpu")
# Run by default: every section but numerics and formats (measured choices, asked for by name), data and input,
# which write about 2 GB to --data-dir (ask for them with --sections), and gpu (the GPU path's check, make gpu-check).
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s not in ("numerics", "formats", "data", "input", "gpu"))


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qatlaw.bench", description=qatlaw.bench.__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="short run: smallest size, 5 samples, 1 warm-up step, eager only, 1 s concurrency windows, "
                        "60 fit runs, 5 resamples, the workflow fit with 20")
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all but numerics, data and gpu)")
    p.add_argument("--config", default="config.yaml", help="config file with the model sizes (default config.yaml)")
    p.add_argument("--sizes", help=f"comma-separated model sizes (default {','.join(DEFAULT_SIZES)})")
    p.add_argument("--threads", type=int, default=1, help="torch threads for peak and train (default 1)")
    p.add_argument("--repeats", type=int, help="timing samples per case (default 9)")
    p.add_argument("--steps", type=int, help="training steps per sample (default 1)")
    p.add_argument("--warmup", type=int, help="untimed steps per case first (default 2)")
    p.add_argument("--modes", help="eager,compile (default both)")
    p.add_argument("--compile-sizes", help="sizes to also time compiled (default: the largest of --sizes)")
    p.add_argument("--concurrency-seconds", type=float, help="measured seconds per size (default 5)")
    p.add_argument("--fit-runs", type=int, help="synthetic runs (default 300)")
    p.add_argument("--fit-inits", type=int, help="Chinchilla starts (default: the workflow's, 128)")
    p.add_argument("--fit-boot", type=int, help="bootstrap resamples timed (default 20)")
    p.add_argument("--results", default="results", help="workflow results directory for the pipeline section")
    p.add_argument("--pipeline-wall", type=float, help="wall seconds of the whole snakemake run")
    p.add_argument("--pipeline-wall-file", help="file with that wall time (a number, or `time -p` output)")
    p.add_argument("--cores", type=int, default=2, help="snakemake --cores of that run (default 2)")
    p.add_argument("--data-tokens", help="comma-separated corpus sizes of the data section, in tokens "
                                         f"(default {','.join(str(t) for t in DATA_CORPUS_TOKENS)})")
    p.add_argument("--data-dir", default="results/bench/data-work",
                   help="scratch directory of the data and input sections")
    p.add_argument("--input-tokens", type=float, default=5e8,
                   help="input: tokens of the generated token store (default 5e8: 2 GB)")
    p.add_argument("--paper-config", default="config/paper.yaml",
                   help="gpu: the paper grid's overlay of --config (default config/paper.yaml)")
    p.add_argument("--smoke", action="store_true",
                   help="gpu: the same code on the CPU with tiny shapes, in well under a minute (also when torch sees "
                        "no CUDA GPU)")
    p.add_argument("--require-cuda", action="store_true",
                   help="gpu: fail when torch sees no CUDA GPU instead of running the smoke mode")
    p.add_argument("--peak-flops", type=float,
                   help="gpu: the device's peak bf16 FLOP/s for MFU (default: by device name, H100/H200 989e12, "
                        "A100 312e12)")
    p.add_argument("--vocab", type=int, default=PAPER_VOCAB,
                   help=f"gpu: vocabulary of the paper's shapes (default {PAPER_VOCAB}, the OLMo-2 tokenizer's)")
    p.add_argument("--gpu-eager-only", action="store_true",
                   help="gpu: time MFU eager only, not also under torch.compile as the paper grid trains, and DDP "
                        "eager (saves the compiles, up to a minute a case)")
    p.add_argument("--gpu-budget", type=float, default=BUDGET_S,
                   help=f"gpu: seconds for all parts together (default {BUDGET_S:.0f}: at most 8 min with the "
                        "check's start; each part's cap is its share of it)")
    p.add_argument("--commit", help="gpu: the commit to record (default: git rev-parse HEAD, 'unknown' without git)")
    p.add_argument("--out", default="results/bench", help="output directory for the Parquet tables")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--gpu-part", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        concurrency_worker(json.loads(args.worker))
        return 0
    if args.gpu_part:
        gpu_worker(json.loads(args.gpu_part))
        return 0
    t_start = time.perf_counter()
    from qatlaw.config import load
    from qatlaw.io import write_parquet

    quick = args.quick
    sections = _csv(args.sections)
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown sections: {', '.join(unknown)} (choose from {', '.join(SECTIONS)})")
    cfg = load(args.config)
    sizes = _csv(args.sizes) if args.sizes else ([DEFAULT_SIZES[0]] if quick else list(DEFAULT_SIZES))
    missing = [s for s in sizes if s not in cfg["models"]]
    if missing:
        raise SystemExit(f"sizes not in {args.config}: {', '.join(missing)}")
    repeats = args.repeats or (5 if quick else 9)
    steps = args.steps or 1
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    modes = _csv(args.modes) if args.modes else (["eager"] if quick else list(MODES))
    compile_sizes = _csv(args.compile_sizes) if args.compile_sizes else [sizes[-1]]
    out = Path(args.out)
    tables: dict[str, pd.DataFrame] = {}

    def emit(name: str, table: pd.DataFrame, title: str) -> None:
        tables[name] = table
        write_parquet(table, out / f"{name}.parquet")
        print(f"\n### {title}\n\n{markdown(table)}\n", flush=True)

    info = machine_info(args.threads)
    emit("machine", pd.DataFrame([info]), "Machine")
    peaks = []
    if "peak" in sections or "train" in sections:
        peaks.append(matmul_peak(args.threads, n=1024 if quick else PEAK_N, repeats=repeats) | {"when": "first"})
    if "train" in sections:
        print(f"training: sizes {', '.join(sizes)}; modes {', '.join(modes)} (compiled: {', '.join(compile_sizes)})",
              flush=True)
        train = measure_training(cfg, sizes, threads=args.threads, modes=modes, compile_sizes=compile_sizes,
                                 repeats=repeats, steps=steps, warmup=warmup)
        # the peak again after training: a busy machine can spoil one measurement, and frac_peak takes the best
        peaks.append(matmul_peak(args.threads, n=peaks[0]["n"], repeats=repeats) | {"when": "after train"})
        train["frac_peak"] = train["gflops"] / max(p["gflops_best"] for p in peaks)
    if peaks:
        emit("peak", pd.DataFrame(peaks), f"fp32 matmul peak ({peaks[0]['n']}x{peaks[0]['n']}, {args.threads} "
                                          f"thread(s); frac_peak uses the best)")
    if "train" in sections:
        emit("train", train, "Training throughput and quantization overhead (ratio = step / FP32 step)")
    if "numerics" in sections:
        print(f"numerics: fp32 vs bf16 autocast, sizes {', '.join(sizes)}", flush=True)
        numerics = measure_numerics(cfg, sizes, threads=args.threads, repeats=repeats, steps=steps, warmup=warmup)
        emit("numerics", numerics, "bf16 autocast vs fp32 on this CPU (speedup = fp32 / bf16 step)")
    if "formats" in sections:
        print(f"formats: fake quantization and training steps of MXFP4, NVFP4 and INT4, sizes {', '.join(sizes)}",
              flush=True)
        quant, steps_table = measure_formats(cfg, sizes, threads=args.threads, modes=modes,
                                             compile_sizes=compile_sizes, repeats=repeats, warmup=warmup)
        emit("formats_quant", quant, "Fake quantization per format (ratio = time / INT4's at the same block size)")
        emit("formats_train", steps_table, "Training step per format (ratio = step CPU time / the FP32 step's)")
    if "concurrency" in sections:
        print("concurrency: 2 processes x 1 thread vs 1 process x 2 threads", flush=True)
        conc = measure_concurrency(args.config, sizes, seconds=args.concurrency_seconds or (1.0 if quick else 5.0))
        emit("concurrency", conc, "Threads per job vs parallel jobs (W4A4 G=32, aggregate tokens/s)")
    if "fit" in sections:
        print("fits", flush=True)
        fits = measure_fits(args.fit_runs or (60 if quick else 300), args.fit_inits,
                            args.fit_boot if args.fit_boot is not None else (5 if quick else 20),
                            workflow_boot=20 if quick else 200)
        emit("fit", fits, "Law fits")
    if "data" in sections:
        sizes_tokens = [int(float(t)) for t in _csv(args.data_tokens)] if args.data_tokens else list(DATA_CORPUS_TOKENS)
        print(f"data: corpora of {', '.join(f'{t:,}' for t in sizes_tokens)} tokens in {args.data_dir}", flush=True)
        emit("data", measure_data(sizes_tokens, Path(args.data_dir), args.config),
             "Data stage: tokenize per core, gather, training RSS on the token store")
    if "input" in sections:
        print(f"input: rank 0's batch reads from a store of {args.input_tokens:,.0f} tokens in {args.data_dir}",
              flush=True)
        emit("input", measure_input(Path(args.data_dir), int(args.input_tokens), steps=repeats),
             "Input pipeline per step: cold reads of rank 0 (before: the whole batch; after: its share, prefetched)")
    if "gpu" in sections:
        import torch

        from qatlaw.errors import QatlawError
        from qatlaw.io import atomic_path

        cuda = torch.cuda.is_available()
        if args.require_cuda and (args.smoke or not cuda):
            raise SystemExit("--require-cuda: " + ("--smoke runs on the CPU" if args.smoke else
                                                   "torch sees no CUDA GPU"))
        smoke = args.smoke or not cuda
        if smoke and not args.smoke:
            print("gpu: torch sees no CUDA GPU: smoke mode on the CPU", flush=True)

        def save(table: pd.DataFrame) -> None:
            write_parquet(table, out / "gpu.parquet")
            with atomic_path(out / "gpu.md") as tmp:
                tmp.write_text(gpu_markdown(table) + "\n", encoding="utf-8")

        try:
            gpu = measure_gpu(args.config, args.paper_config, smoke=smoke, vocab=args.vocab,
                              compile=not args.gpu_eager_only, peak=args.peak_flops, budget_s=args.gpu_budget,
                              commit=args.commit, save=save)
        except QatlawError as exc:
            raise SystemExit(f"gpu: {exc}") from None
        tables["gpu"] = gpu
        print(f"\n### GPU path\n\n{gpu_markdown(gpu)}\n", flush=True)
    pipeline = None
    if "pipeline" in sections:
        results = Path(args.results)
        if (results / "benchmarks").is_dir():
            wall = args.pipeline_wall
            if wall is None and args.pipeline_wall_file:
                wall = read_wall_seconds(args.pipeline_wall_file)
            pipeline = pipeline_overhead(results, wall, cores=args.cores, threads_per_job=args.threads)
            emit("pipeline", pd.DataFrame([pipeline]), f"Pipeline overhead ({results})")
        else:
            print(f"\npipeline: skipped ({results / 'benchmarks'} not found)")
    bench_s = time.perf_counter() - t_start
    emit("targets", targets(tables.get("train"), tables.get("fit"), pipeline, tables.get("concurrency"), bench_s,
                            tables.get("data")),
         f"Targets (measured vs bound; {bench_s:.0f} s in all, load average {os.getloadavg()[0]:.2f} at the end)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
