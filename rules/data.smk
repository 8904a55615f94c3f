# Data stage: fetch corpus packages -> tokenizer -> one tokenize job per corpus file (scatter) -> gather: the
# split by document, the token stores train.npy / val.npy (read window by window), the document table and the manifest.


rule fetch_corpus:
    output:
        "resources/corpus/{source}.pkg",
    log:
        "results/logs/fetch_corpus/{source}.log",
    wildcard_constraints:
        source="|".join(builtin_sources.BUILTIN_SOURCES),
    conda:
        "../envs/data.yaml"
    shell:
        "qatlaw fetch {wildcards.source} --out {output} > {log} 2>&1"


if config["data"]["tokenizer"]:

    rule tokenizer:
        input:
            config["data"]["tokenizer"],
        output:
            "results/data/tokenizer.json",
        params:
            vocab_size=config["data"]["vocab_size"],
            eos=PLAN.eos_flag(),
        log:
            "results/logs/tokenizer.log",
        conda:
            "../envs/data.yaml"
        shell:
            "qatlaw tokenizer --from-file {input:q} --vocab-size {params.vocab_size} {params.eos} "
            "--out {output} > {log} 2>&1"

else:

    rule tokenizer:
        input:
            PLAN.corpus_files(),
        output:
            "results/data/tokenizer.json",
        params:
            shards=PLAN.corpus_shards(),
            vocab_size=config["data"]["vocab_size"],
            min_frequency=config["data"]["tokenizer_min_frequency"],
            sample_mb=config["data"]["tokenizer_sample_mb"],
            val_fraction=config["data"]["val_fraction"],
            seed=config["data"]["split_seed"],
            text_field=config["data"]["text_field"],
            min_chars=config["data"]["min_doc_chars"],
        threads: 2
        resources:
            # the sample's texts, and the BPE trainer's word counts
            mem_mb=2000 + 16 * config["data"]["tokenizer_sample_mb"],
            runtime=tokenizer_runtime,
        log:
            "results/logs/tokenizer.log",
        benchmark:
            "results/benchmarks/tokenizer.tsv"
        conda:
            "../envs/data.yaml"
        shell:
            "RAYON_NUM_THREADS={threads} qatlaw tokenizer --shards {params.shards:q} --vocab-size {params.vocab_size} "
            "--min-frequency {params.min_frequency} --sample-mb {params.sample_mb} "
            "--val-fraction {params.val_fraction} --seed {params.seed} --text-field {params.text_field:q} "
            "--min-chars {params.min_chars} --out {output} > {log} 2>&1"


rule tokenize:
    input:
        files=tokenize_job_files,
        tokenizer="results/data/tokenizer.json",
    output:
        # the token file is only read by gather, which copies it into the stores
        tokens=temp("results/data/shards/{job}.npy"),
        docs="results/data/shards/{job}.parquet",
    params:
        shards=tokenize_job_shards,
        text_field=config["data"]["text_field"],
        min_chars=config["data"]["min_doc_chars"],
        seed=config["data"]["split_seed"],
        eos=PLAN.eos_flag(),
    wildcard_constraints:
        job="[A-Za-z0-9_.-]+",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=tokenize_runtime,
    log:
        "results/logs/tokenize/{job}.log",
    benchmark:
        "results/benchmarks/tokenize/{job}.tsv"
    conda:
        "../envs/data.yaml"
    shell:
        "RAYON_NUM_THREADS={threads} qatlaw tokenize --shards {params.shards:q} --tokenizer {input.tokenizer} "
        "{params.eos} --text-field {params.text_field:q} --min-chars {params.min_chars} --seed {params.seed} "
        "--tokens {output.tokens} --docs {output.docs} > {log} 2>&1"


rule gather:
    input:
        tokens=PLAN.tokenize_outputs("npy"),
        docs=PLAN.tokenize_outputs("parquet"),
        tokenizer="results/data/tokenizer.json",
    output:
        train="results/data/train.npy",
        val="results/data/val.npy",
        documents="results/data/documents.parquet",
        manifest="results/data/manifest.json",
    params:
        val_fraction=config["data"]["val_fraction"],
        seed=config["data"]["split_seed"],
        eos=PLAN.eos_flag(),
    resources:
        # each document's source and split draw, and one job's document table at a time
        mem_mb=gather_mem_mb,
        runtime=gather_runtime,
    log:
        "results/logs/gather.log",
    benchmark:
        "results/benchmarks/gather.tsv"
    conda:
        "../envs/data.yaml"
    shell:
        "qatlaw gather --tokens {input.tokens} --docs {input.docs} --tokenizer {input.tokenizer} {params.eos} "
        "--train {output.train} --val {output.val} --doc-table {output.documents} --manifest {output.manifest} "
        "--val-fraction {params.val_fraction} --seed {params.seed} > {log} 2>&1"


rule data_budget:
    input:
        "results/data/manifest.json",
    output:
        "results/data/budget.json",
    params:
        tokens=grid.token_budgets(config),
        allow_repeat=PLAN.allow_repeat_flag(),
    log:
        "results/logs/data_budget.log",
    conda:
        "../envs/data.yaml"
    shell:
        "qatlaw budget --manifest {input} --tokens {params.tokens} {params.allow_repeat} "
        "--out {output} > {log} 2>&1"
