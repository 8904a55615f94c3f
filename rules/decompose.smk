# Decomposition stage: δ of every run, δ_W4A4 vs δ_W4A16 + δ_W16A4, and the per-layer quantization error.


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


rule layer_error:
    input:
        models=run_models(),
        val="results/data/val.npy",
    output:
        "results/analysis/layer_error.parquet",
    params:
        tokens=config["analysis"]["tokens"],
        groups=config["analysis"]["groups"],
        bits=config["analysis"]["bits"],
    threads: 2
    resources:
        mem_mb=4000,
    log:
        "results/logs/layer_error.log",
    benchmark:
        "results/benchmarks/layer_error.tsv"
    conda:
        "../envs/train.yaml"
    shell:
        "qatlaw layer-error {input.models} --val {input.val} --out {output} --tokens {params.tokens} "
        "--groups {params.groups} --bits {params.bits} --threads {threads} > {log} 2>&1"
