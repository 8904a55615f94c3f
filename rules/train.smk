# Training stage: one job per grid cell (BF16 baselines once per size/tokens/seed), then the run table.
# Resumable checkpoints live in results/checkpoints/, outside the outputs that Snakemake deletes on failure.


rule train:
    input:
        train="results/data/train.parquet",
        val="results/data/val.parquet",
        manifest="results/data/manifest.json",
        budget="results/data/budget.json",
    output:
        summary="results/runs/{size}/{tokens}/seed{seed}/{variant}/summary.parquet",
        metrics="results/runs/{size}/{tokens}/seed{seed}/{variant}/metrics.parquet",
        model="results/runs/{size}/{tokens}/seed{seed}/{variant}/model.pt",
    params:
        settings=run_settings_json,
        checkpoint="results/checkpoints/{size}/{tokens}/seed{seed}/{variant}/ckpt.pt",
    threads: config["training"]["threads"]
    resources:
        mem_mb=train_mem_mb,
        runtime=train_runtime,
    log:
        "results/logs/train/{size}/{tokens}/seed{seed}/{variant}.log",
    benchmark:
        "results/benchmarks/train/{size}/{tokens}/seed{seed}/{variant}.tsv"
    conda:
        "../envs/train.yaml"
    shell:
        "qatlaw train --settings {params.settings:q} --train-tokens {input.train} --val-tokens {input.val} "
        "--manifest {input.manifest} --summary {output.summary} --metrics {output.metrics} "
        "--model {output.model} --checkpoint {params.checkpoint} > {log} 2>&1"


rule runs:
    input:
        run_summaries(),
    output:
        "results/runs.parquet",
    log:
        "results/logs/runs.log",
    conda:
        "../envs/train.yaml"
    shell:
        "qatlaw runs {input} --out {output} > {log} 2>&1"
