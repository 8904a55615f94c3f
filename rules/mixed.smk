# Mixed-precision stage: how much δ changes when one layer's tensor goes to 8 bit (fc2a8 and the ablation).


rule mixed:
    input:
        "results/runs.parquet",
    output:
        table="results/analysis/mixed_precision.parquet",
        ranking="results/analysis/mixed_ranking.parquet",
    log:
        "results/logs/mixed.log",
    conda:
        "../envs/analysis.yaml"
    shell:
        "qatlaw mixed --runs {input} --out {output.table} --ranking {output.ranking} > {log} 2>&1"
