# qat-scaling: Scaling Law for Quantization-Aware Training (Chen et al., 2025), end to end.
# Run with `make run` (or `snakemake --cores 2` inside the project's virtual environment).
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "rules/common.smk"


wildcard_constraints:
    source="[A-Za-z0-9_]+",


include: "rules/data.smk"


rule all:
    default_target: True
    input:
        final_outputs(),
