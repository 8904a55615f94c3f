# Outlier stage: kurtosis, max/median and top-1% share of every linear layer's input, BF16 and QAT models.


rule outliers:
    input:
        models=run_models(),
        val="results/data/val.npy",
    output:
        "results/analysis/outliers.parquet",
    params:
        tokens=config["analysis"]["tokens"],
    threads: 2
    resources:
        mem_mb=4000,
    log:
        "results/logs/outliers.log",
    benchmark:
        "results/benchmarks/outliers.tsv"
    conda:
        "../envs/train.yaml"
    shell:
        "qatlaw outliers {input.models} --val {input.val} --out {output} --tokens {params.tokens} "
        "--threads {threads} > {log} 2>&1"
