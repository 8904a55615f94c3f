# Training stage: one job per grid cell (BF16 baselines once per size/tokens/seed), then the run table, which also
# takes the runs restored from a shipped study (config key restore). With grid.qat_fractions below 1, a baseline's
# job also writes the trunk checkpoints its cell's branches start from (inputs of their jobs), and rule ptq scores
# a baseline's final model under each precision at fraction 0.
# Resumable checkpoints live in results/checkpoints/, outside the outputs that Snakemake deletes on failure.
# How runs execute (threads, GPUs, device, checkpoint interval, compile, micro-batch, activation checkpointing) comes
# from threads and resources, which are not rerun triggers, so changing it retrains nothing; the run is identified
# by params.settings.


if not BATCHED:

    rule train:
        input:
            **TRAIN_INPUTS,
        output:
            summary="results/runs/{size}/{tokens}/seed{seed}/{variant}/summary.parquet",
            metrics="results/runs/{size}/{tokens}/seed{seed}/{variant}/metrics.parquet",
            model="results/runs/{size}/{tokens}/seed{seed}/{variant}/model.pt",
        params:
            settings=run_settings_json,
            checkpoint="results/checkpoints/{size}/{tokens}/seed{seed}/{variant}/ckpt.pt",
            run_logs="",
            trunks="",
        threads: config["training"]["threads"]
        retries: train_retries()
        wildcard_constraints:
            size=node_sizes(multi_node=False) or "^$",
            variant=TRAINED_VARIANT,
        resources:
            mem_mb=train_mem_mb,
            runtime=train_runtime,
            gpu=train_gpus,
            nodes=1,
            **train_execution(train_micro_batch_size, train_checkpointing),
        log:
            job="results/logs/train/{size}/{tokens}/seed{seed}/{variant}.log",
        benchmark:
            "results/benchmarks/train/{size}/{tokens}/seed{seed}/{variant}.tsv"
        conda:
            "../envs/train.yaml"
        shell:
            TRAIN_SHELL

    if node_sizes(multi_node=True):

        # Runs of more GPUs than one node has: the job's shell runs in the SLURM batch step (the executor plugin's
        # `mpi` jobs), where `qatlaw train` starts one torchrun per node with srun.
        use rule train as train_nodes with:
            wildcard_constraints:
                size=node_sizes(multi_node=True),
            resources:
                mem_mb=train_mem_mb,
                runtime=train_runtime,
                gpu=train_gpus,
                nodes=train_nodes,
                tasks=train_nodes,
                tasks_per_gpu=0,
                mpi="srun",
                **train_execution(train_micro_batch_size, train_checkpointing),

else:
    for i, batch in enumerate(TRAIN_BATCHES):

        rule:
            name:
                batch_name(i)
            input:
                **TRAIN_INPUTS,
                trunks=batch_trunk_inputs(batch),
            output:
                summary=batch_files(batch, "summary.parquet"),
                metrics=batch_files(batch, "metrics.parquet"),
                model=batch_files(batch, "model.pt"),
                trunks=batch_trunk_outputs(batch),
            params:
                settings=batch_settings_json(batch),
                checkpoint=batch_checkpoints(batch),
                run_logs=run_log_flag(batch),
                trunks=batch_trunk_flags(batch),
            threads: config["training"]["threads"]
            priority: batch_priority(batch)
            resources:
                **batch_resources(batch),
                **train_execution(*job_plan([RUNS[run_id] for run_id in batch])),
            log:
                job=batch_job_log(i),
                runs=batch_run_logs(batch),
            benchmark:
                batch_job_log(i).replace("results/logs/", "results/benchmarks/").replace(".log", ".tsv")
            conda:
                "../envs/train.yaml"
            shell:
                TRAIN_SHELL


if PTQ_RUNS:

    # Post-training quantization (QAT fraction 0): the baseline's final model scored under the precision.
    rule ptq:
        input:
            summary=ptq_baseline("summary.parquet"),
            metrics=ptq_baseline("metrics.parquet"),
            model=ptq_baseline("model.pt"),
            val="results/data/val.npy",
            manifest="results/data/manifest.json",
        output:
            summary="results/runs/{size}/{tokens}/seed{seed}/{variant}/summary.parquet",
            metrics="results/runs/{size}/{tokens}/seed{seed}/{variant}/metrics.parquet",
            model="results/runs/{size}/{tokens}/seed{seed}/{variant}/model.pt",
        params:
            settings=run_settings_json,
        threads: config["training"]["threads"]
        wildcard_constraints:
            variant=r"[^/]+_f0",
        resources:
            mem_mb=train_mem_mb,
            runtime=train_runtime,
            # windows per forward: the training micro-batch (a whole paper batch at once runs out of GPU memory)
            micro_batch_size=train_micro_batch_size,
            loss_chunk_tokens=config["training"]["loss_chunk_tokens"] or 0,
            **analysis_execution(),
        log:
            "results/logs/train/{size}/{tokens}/seed{seed}/{variant}.log",
        conda:
            "../envs/train.yaml"
        shell:
            "qatlaw ptq --settings {params.settings:q} --baseline-summary {input.summary} "
            "--baseline-metrics {input.metrics} --baseline-model {input.model} --val-tokens {input.val} "
            "--manifest {input.manifest} --summary {output.summary} --metrics {output.metrics} "
            "--model {output.model} --threads {threads} --device {resources.analysis_device} "
            "--micro-batch-size {resources.micro_batch_size} --loss-chunk-tokens {resources.loss_chunk_tokens} "
            "> {log} 2>&1"


if RESTORED:

    # The runs of a shipped study that count as done (config key restore): summaries, metrics, analysis rows.
    rule restore:
        input:
            restore_inputs(),
        output:
            reference.restored_files(RESTORED),
        params:
            folder=config["restore"],
            runs=" ".join(RESTORED),
        log:
            "results/logs/restore.log",
        conda:
            "../envs/analysis.yaml"
        shell:
            "qatlaw restore {params.folder:q} --runs {params.runs} --results results > {log} 2>&1"


if EXTERNAL:

    # A run table from outside (config key external.table): checked and normalized, nothing trained.
    rule import_runs:
        input:
            EXTERNAL,
        output:
            "results/runs.parquet",
        params:
            precisions=" ".join(shlex.quote(p) for p in EXTERNAL_PRECISIONS),
        log:
            "results/logs/runs.log",
        conda:
            "../envs/analysis.yaml"
        shell:
            "qatlaw import-runs {input:q} --out {output} "
            + ("--precision {params.precisions} " if EXTERNAL_PRECISIONS else "")
            + "> {log} 2>&1"

else:

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
