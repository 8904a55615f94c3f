# Analyses of the trained models: the per-layer quantization error (relative MSE and QSNR of each linear layer's
# weights and input under each analysis.groups x analysis.bits) and the outlier statistics (kurtosis, max/median
# and top-1% share of every linear layer's input), BF16 and QAT models. Each is one job per (size, tokens, seed)
# cell, its models one after another on the CPU or one GPU, then a gather of the cells' tables in grid order.

# analysis -> its qatlaw subcommand and the flags only it takes (a list as space-separated values)
CELL_ANALYSES = {
    "layer_error": ("layer-error", {"groups": config["analysis"]["groups"], "bits": config["analysis"]["bits"]}),
    "outliers": ("outliers", {}),
}


for _analysis, (_command, _flags) in CELL_ANALYSES.items():

    rule:
        name:
            f"{_analysis}_cell"
        input:
            models=cell_models,
            val="results/data/val.npy",
        output:
            f"results/analysis/{_analysis}/{{size}}/{{tokens}}/seed{{seed}}.parquet",
        params:
            command=_command,
            tokens=config["analysis"]["tokens"],
            flags=workflow_plan.analysis_flags(_flags),
        threads: config["training"]["threads"]
        resources:
            mem_mb=analysis_mem_mb,
            runtime=analysis_runtime,
            **PLAN.analysis_execution(),
        log:
            f"results/logs/{_analysis}/{{size}}/{{tokens}}/seed{{seed}}.log",
        benchmark:
            f"results/benchmarks/{_analysis}/{{size}}/{{tokens}}/seed{{seed}}.tsv"
        conda:
            "../envs/train.yaml"
        shell:
            "qatlaw {params.command} {input.models} --val {input.val} --out {output} --tokens {params.tokens} "
            "{params.flags}--threads {threads} --device {resources.analysis_device} > {log} 2>&1"

    rule:
        name:
            _analysis
        input:
            PLAN.cell_tables(_analysis),
        output:
            f"results/analysis/{_analysis}.parquet",
        params:
            runs=PLAN.grid_run_ids(),
        log:
            f"results/logs/{_analysis}.log",
        conda:
            "../envs/analysis.yaml"
        shell:
            "qatlaw gather-analysis {input} --runs {params.runs} --out {output} > {log} 2>&1"
