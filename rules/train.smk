# Training stage: one job per grid cell (BF16 baselines once per size/tokens/seed), then the run table.
# Resumable checkpoints live in results/checkpoints/, outside the outputs that Snakemake deletes on failure.
# How runs execute (threads, GPUs, device, checkpoint interval, compile, micro-batch) comes from threads and
# resources, which are not rerun triggers, so changing it retrains nothing; the run is identified by params.settings.


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
        **train_execution(),
    log:
        "results/logs/train/{size}/{tokens}/seed{seed}/{variant}.log",
    benchmark:
        "results/benchmarks/train/{size}/{tokens}/seed{seed}/{variant}.tsv"
    conda:
        "../envs/train.yaml"
    shell:
        "qatlaw train --settings {params.settings:q} --train-tokens {input.train} --val-tokens {input.val} "
        "--manifest {input.manifest} --summary {output.summary} --metrics {output.metrics} "
        "--model {output.model} --checkpoint {params.checkpoint} --threads {threads} --gpus {resources.gpu} "
        "--device {resources.train_device} --checkpoint-every {resources.checkpoint_every} "
        "--compile {resources.compile} --micro-batch-size {resources.micro_batch_size} > {log} 2>&1"


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
