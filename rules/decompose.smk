# Decomposition stage: δ of every run, δ_W4A4 vs δ_W4A16 + δ_W16A4, and the per-layer quantization error.


rule decompose:
    input:
        "results/runs.parquet",
    output:
        decomposition="results/analysis/decomposition.parquet",
        fit="results/analysis/decomposition_fit.parquet",
    log:
        "results/logs/decompose.log",
    conda:
        "../envs/analysis.yaml"
    shell:
        "qatlaw decompose --runs {input} --out {output.decomposition} --fit {output.fit} > {log} 2>&1"


# One job per (size, tokens, seed) cell, its models one after another on the CPU or one GPU, then the gather.
rule layer_error_cell:
    input:
        models=cell_models,
        val="results/data/val.npy",
    output:
        "results/analysis/layer_error/{size}/{tokens}/seed{seed}.parquet",
    params:
        tokens=config["analysis"]["tokens"],
        groups=config["analysis"]["groups"],
        bits=config["analysis"]["bits"],
    threads: config["training"]["threads"]
    resources:
        mem_mb=analysis_mem_mb,
        runtime=analysis_runtime,
        **analysis_execution(),
    log:
        "results/logs/layer_error/{size}/{tokens}/seed{seed}.log",
    benchmark:
        "results/benchmarks/layer_error/{size}/{tokens}/seed{seed}.tsv"
    conda:
        "../envs/train.yaml"
    shell:
        "qatlaw layer-error {input.models} --val {input.val} --out {output} --tokens {params.tokens} "
        "--groups {params.groups} --bits {params.bits} --threads {threads} --device {resources.analysis_device} "
        "> {log} 2>&1"


rule layer_error:
    input:
        cell_tables("layer_error"),
    output:
        "results/analysis/layer_error.parquet",
    params:
        runs=grid_run_ids(),
    log:
        "results/logs/layer_error.log",
    conda:
        "../envs/analysis.yaml"
    shell:
        "qatlaw gather-analysis {input} --runs {params.runs} --out {output} > {log} 2>&1"
