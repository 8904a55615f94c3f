# Outlier stage: kurtosis, max/median and top-1% share of every linear layer's input, BF16 and QAT models.
# One job per (size, tokens, seed) cell, its models one after another on the CPU or one GPU, then the gather.


rule outliers_cell:
    input:
        models=cell_models,
        val="results/data/val.npy",
    output:
        "results/analysis/outliers/{size}/{tokens}/seed{seed}.parquet",
    params:
        tokens=config["analysis"]["tokens"],
    threads: config["training"]["threads"]
    resources:
        mem_mb=analysis_mem_mb,
        runtime=analysis_runtime,
        **analysis_execution(),
    log:
        "results/logs/outliers/{size}/{tokens}/seed{seed}.log",
    benchmark:
        "results/benchmarks/outliers/{size}/{tokens}/seed{seed}.tsv"
    conda:
        "../envs/train.yaml"
    shell:
        "qatlaw outliers {input.models} --val {input.val} --out {output} --tokens {params.tokens} "
        "--threads {threads} --device {resources.analysis_device} > {log} 2>&1"


rule outliers:
    input:
        cell_tables("outliers"),
    output:
        "results/analysis/outliers.parquet",
    params:
        runs=grid_run_ids(),
    log:
        "results/logs/outliers.log",
    conda:
        "../envs/analysis.yaml"
    shell:
        "qatlaw gather-analysis {input} --runs {params.runs} --out {output} > {log} 2>&1"
