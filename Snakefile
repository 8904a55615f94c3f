# qat-scaling: Scaling Law for Quantization-Aware Training (Chen et al., 2025), end to end.
# Run with `make run` (or `snakemake --cores 2` inside the project's virtual environment).
from snakemake.utils import min_version

min_version("9.0")


from snakemake.exceptions import WorkflowError

from qatlaw.config import ConfigError, load, use_own_tools


# The workflow's own tools (qatlaw, torchrun) come first on the jobs' PATH, however Snakemake was started.
use_own_tools()


# The config is read and validated once, by qatlaw.config: config.yaml with the --configfile/--config overlays
# (here already in `config`) merged over it, and the schema's defaults filled in. A wrong value is one line naming
# the key, malformed YAML in config.yaml one naming the file and line (Snakemake's own parser names neither).
try:
    VALIDATED = load("config.yaml", config)
except ConfigError as exc:
    raise WorkflowError(f"invalid config: {exc}") from None


# Recorded by Snakemake (run metadata, the report); its values give way to the validated config.
configfile: "config.yaml"


config.update(VALIDATED)


report: "report/workflow.rst"


include: "rules/common.smk"


wildcard_constraints:
    source="[A-Za-z0-9_]+",
    size="[A-Za-z0-9.]+",
    tokens="[0-9]+[KMBT]?",
    seed="[0-9]+",
    variant="BF16|W[0-9]+A[0-9]+(-[a-z0-9]+)*_g([0-9]+|channel)",


include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/decompose.smk"
include: "rules/cell_analyses.smk"
include: "rules/mixed.smk"
include: "rules/fit.smk"
include: "rules/figures.smk"
include: "rules/findings.smk"


rule all:
    default_target: True
    input:
        final_outputs(),
