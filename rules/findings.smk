# Findings stage: every finding of the paper beside this grid's number, 90% interval and verdict.


rule findings:
    input:
        runs="results/runs.parquet",
        decomposition="results/analysis/decomposition.parquet",
        outliers="results/analysis/outliers.parquet",
        params="results/fit/params.parquet",
        comparison="results/fit/comparison.parquet",
        bootstrap="results/fit/bootstrap.parquet",
    output:
        md="results/FINDINGS.md",
        parquet="results/findings.parquet",
    params:
        results=subpath(input.runs, parent=True),
        metric=config["fit"]["metric"],
    log:
        "results/logs/findings.log",
    conda:
        "../envs/analysis.yaml"
    shell:
        "qatlaw findings --results {params.results} --out {output.md} --parquet {output.parquet} "
        "--metric {params.metric} --title 'Findings of this grid' > {log} 2>&1"
