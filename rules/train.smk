# Training stage: one job per grid cell (BF16 baselines once per size/tokens/seed), then the run table, which also
# takes the runs restored from a shipped study (config key restore). With grid.qat_fractions below 1, a baseline's
# job also writes the trunk checkpoints its cell's branches start from (inputs of their jobs), and rule ptq scores
# a baseline's final model under each precision at fraction 0.
# Resumable checkpoints live in results/checkpoints/, outside the outputs that Snakemake deletes on failure.
# How runs execute (threads, GPUs, device, checkpoint interval, compile, micro-batch, activation checkpointing) comes
# from threads and resources, which are not rerun triggers, so changing it retrains nothing; the run is identified
# by params.settings.


if not PLAN.batched:

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
        retries: PLAN.train_retries()
        wildcard_constraints:
            size=PLAN.node_sizes(multi_node=False) or "^$",
            variant=TRAINED_VARIANT,
        resources:
            mem_mb=train_mem_mb,
            runtime=train_runtime,
            gpu=train_gpus,
            nodes=1,
            **PLAN.train_execution(train_micro_batch_size, train_checkpointing),
        log:
            job="results/logs/train/{size}/{tokens}/seed{seed}/{variant}.log",
        benchmark:
            "results/benchmarks/train/{size}/{tokens}/seed{seed}/{variant}.tsv"
        conda:
            "../envs/train.yaml"
        shell:
            TRAIN_SHELL

    if PLAN.node_sizes(multi_node=True):

        # Runs of more GPUs than one node has: the job's shell runs in the SLURM batch step (the executor plugin's
        # `mpi` jobs), where `qatlaw train` starts one torchrun per node with srun.
        use rule train as train_nodes with:
            wildcard_constraints:
                size=PLAN.node_sizes(multi_node=True),
            resources:
                mem_mb=train_mem_mb,
                runtime=train_runtime,
                gpu=train_gpus,
                nodes=train_nodes,
                tasks=train_nodes,
                tasks_per_gpu=0,
                mpi="srun",
                **PLAN.train_execution(train_micro_batch_size, train_checkpointing),

else:
    for i, batch in enumerate(PLAN.train_batches):

        rule:
            name:
                PLAN.batch_name(i)
            input:
                **TRAIN_INPUTS,
                trunks=PLAN.batch_trunk_inputs(batch),
            output:
                summary=workflow_plan.run_outputs(batch, "summary.parquet"),
                metrics=workflow_plan.run_outputs(batch, "metrics.parquet"),
                model=workflow_plan.run_outputs(batch, "model.pt"),
                trunks=PLAN.batch_trunk_outputs(batch),
            params:
                settings=PLAN.batch_settings_json(batch),
                checkpoint=workflow_plan.batch_checkpoints(batch),
                run_logs=workflow_plan.run_log_flag(batch),
                trunks=PLAN.batch_trunk_flags(batch),
            threads: config["training"]["threads"]
            priority: PLAN.batch_priority(batch)
            resources:
                **PLAN.batch_resources(batch),
                **PLAN.batch_execution(batch),
            log:
                job=PLAN.batch_job_log(i),
                runs=workflow_plan.batch_run_logs(batch),
            benchmark:
                PLAN.batch_job_log(i).replace("results/logs/", "results/benchmarks/").replace(".log", ".tsv")
            conda:
                "../envs/train.yaml"
            shell:
                TRAIN_SHELL


if PLAN.ptq_runs:

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
            **PLAN.analysis_execution(),
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


if PLAN.restored:

    # The runs of a shipped study that count as done (config key restore): summaries, metrics, analysis rows.
    rule restore:
        input:
            PLAN.restore_inputs(),
        output:
            reference.restored_files(PLAN.restored),
        params:
            folder=config["restore"],
            runs=" ".join(PLAN.restored),
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
            PLAN.run_files("summary.parquet"),
        output:
            "results/runs.parquet",
        log:
            "results/logs/runs.log",
        conda:
            "../envs/train.yaml"
        shell:
            "qatlaw runs {input} --out {output} > {log} 2>&1"
