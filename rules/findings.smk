# Findings stage: every finding of the paper beside this grid's number, its interval and verdict.


rule findings:
    input:
        runs="results/runs.parquet",
        decomposition=[] if EXTERNAL and not EXTERNAL_DECOMPOSES else "results/analysis/decomposition.parquet",
        outliers=[] if EXTERNAL else "results/analysis/outliers.parquet",
        params="results/fit/params.parquet",
        predictions="results/fit/predictions.parquet",
        bootstrap="results/fit/bootstrap.parquet",
    output:
        md="results/FINDINGS.md",
        parquet="results/findings.parquet",
    params:
        results=subpath(input.runs, parent=True),
        metric=config["fit"]["metric"],
        note=EXTERNAL_STAGES
        if EXTERNAL
        else "The measured CPU-scale studies are reference/laptop-v2/FINDINGS.md (96 runs) and "
        "reference/laptop/FINDINGS.md (70 runs); a grid this small leaves most findings within noise or not "
        "measurable.",
    log:
        "results/logs/findings.log",
    conda:
        "../envs/analysis.yaml"
    shell:
        "qatlaw findings --results {params.results} --out {output.md} --parquet {output.parquet} "
        "--metric {params.metric} --title 'Findings of this grid' --note {params.note:q} > {log} 2>&1"
