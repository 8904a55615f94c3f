# Helpers for every stage (config validation and input functions), kept apart from the rules.
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from qatlaw import config as qconfig
from qatlaw import corpus


try:
    # One line naming the key and the reason, before any job runs.
    qconfig.validate(config)
except qconfig.ConfigError as exc:
    raise WorkflowError(f"invalid config: {exc}") from None
# Same schema through Snakemake, which also fills in the documented defaults.
validate(config, schema="../config/schema.yaml")

SOURCES = qconfig.source_ids(config)
BUILTIN = [s for s in SOURCES if s in corpus.BUILTIN_SOURCES]
USER = [s for s in SOURCES if s not in corpus.BUILTIN_SOURCES]


def final_outputs():
    """Targets of the default run."""
    return [
        "results/data/tokenizer.json",
        "results/data/manifest.json",
        "results/data/budget.json",
    ]


def corpus_parts():
    """Document Parquet of every corpus part, in config order."""
    return expand("results/data/corpus/{source}.parquet", source=SOURCES)


def user_source_files(wildcards):
    """The files a user corpus part reads, so edits to them re-run the data stage."""
    return corpus.resolve_user_files(SOURCES[wildcards.source])


def user_source_spec(wildcards):
    """The path or glob of a user corpus part."""
    return SOURCES[wildcards.source]


def allow_repeat_flag():
    """CLI flag that lets token budgets exceed the training split."""
    return "--allow-repeat" if config["data"]["allow_repeat"] else ""
