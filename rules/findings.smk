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
        note="The measured CPU-scale study, 70 runs with 90% intervals, is reference/laptop/FINDINGS.md "
        "(make reference re-creates it); a small grid leaves most findings within noise.",
    log:
        "results/logs/findings.log",
    conda:
        "../envs/analysis.yaml"
    shell:
        "qatlaw findings --results {params.results} --out {output.md} --parquet {output.parquet} "
        "--metric {params.metric} --title 'Findings of this grid' --note {params.note:q} > {log} 2>&1"
