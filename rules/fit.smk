# Fit stage: Chinchilla on the BF16 runs, the unified QAT law per precision, EPM and no-D baselines,
# bootstrap intervals and held-out predictions.


rule fit:
    input:
        "results/runs.parquet",
    output:
        params="results/fit/params.parquet",
        predictions="results/fit/predictions.parquet",
        comparison="results/fit/comparison.parquet",
        bootstrap="results/fit/bootstrap.parquet",
    params:
        out_dir=subpath(output.params, parent=True),
        bootstrap=config["fit"]["bootstrap"],
        seed=config["fit"]["seed"],
        metric=config["fit"]["metric"],
        untie="" if config["fit"]["tie"] else "--untie",
    log:
        "results/logs/fit.log",
    benchmark:
        "results/benchmarks/fit.tsv"
    conda:
        "../envs/analysis.yaml"
    shell:
        "qatlaw fit --runs {input} --out-dir {params.out_dir} --bootstrap {params.bootstrap} "
        "--seed {params.seed} --metric {params.metric} {params.untie} > {log} 2>&1"
