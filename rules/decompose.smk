# Decomposition stage: δ of every run, and δ_W4A4 vs δ_W4A16 + δ_W16A4 (the per-layer error: cell_analyses.smk).


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
