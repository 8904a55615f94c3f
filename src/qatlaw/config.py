"""Load and validate the workflow configuration (config.yaml + config/*.yaml grids).

The JSON Schema in ``schema.yaml`` (linked as ``config/schema.yaml``) checks shapes and types; the checks
here cover what a schema cannot: size names that must exist in the model table, group sizes that must divide
every linear layer's input, precision strings, token budgets and corpus paths. Every failure is a
``ConfigError`` whose message is one line naming the key and the reason.
"""

from __future__ import annotations

import copy
import functools
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from qatlaw import grid as qgrid  # grid: the name of a config section here
from qatlaw import memory, precision
from qatlaw.errors import ConfigError
from qatlaw.grid import linear_inputs, on_gpu, parse_tokens, run_gpus, run_nodes

SCHEMA_PATH = Path(__file__).with_name("schema.yaml")


def use_own_tools() -> None:
    """Put the directory of the running Python (the environment's bin/, holding ``qatlaw``) first on PATH, so
    that the commands of the workflow's jobs find the package's tools without an activated environment."""
    here = str(Path(sys.executable).parent)
    os.environ["PATH"] = os.pathsep.join([here, *(p for p in os.environ.get("PATH", "").split(os.pathsep) if p)])


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML mapping, with a one-line error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``override`` into a copy of ``base`` (as Snakemake merges --configfile); a null in
    ``override`` replaces the value of ``base`` (``grid: {ablation: null}`` switches that sub-grid off)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load(*sources: str | Path | Mapping[str, Any], check_files: bool = True) -> dict[str, Any]:
    """Read, merge (later overrides earlier), validate and fill defaults; return the config dict. Without
    ``check_files`` the corpus and tokenizer files are not looked at, and data.vocab_size must be given."""
    if not sources:
        raise ConfigError("no config given")
    cfg: dict[str, Any] = {}
    for src in sources:
        cfg = merge(cfg, src if isinstance(src, Mapping) else read_yaml(src))
    return validate(cfg, check_files)


def _key_path(path: Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def _schema_error_message(err: jsonschema.ValidationError) -> str:
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = set(err.schema.get("properties", {}))
        extra = sorted(k for k in err.instance if k not in allowed)
        if extra:
            return f"{_key_path(err.absolute_path)}: unknown key '{extra[0]}' (allowed: {', '.join(sorted(allowed))})"
    if err.validator == "required":
        return f"{_key_path(err.absolute_path)}: {err.message}"
    if err.validator == "oneOf" and err.schema.get("description"):
        return f"{_key_path(err.absolute_path)}: {err.instance!r} is not {err.schema['description']}"
    return f"{_key_path(err.absolute_path)}: {err.message}"


def _fill_defaults(instance: Any, schema: Mapping[str, Any], root: Mapping[str, Any]) -> None:
    if "$ref" in schema:
        ref = schema["$ref"].removeprefix("#/").split("/")
        target: Any = root
        for part in ref:
            target = target[part]
        schema = target
    if not isinstance(instance, dict):
        return
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            _fill_defaults(instance[key], sub, root)
    extra = schema.get("additionalProperties")
    if isinstance(extra, Mapping):
        for key, value in instance.items():
            if key not in schema.get("properties", {}):
                _fill_defaults(value, extra, root)


@functools.cache
def load_schema() -> dict[str, Any]:
    """The configuration JSON Schema (shared between callers: read it, never change it)."""
    return yaml.safe_load(SCHEMA_PATH.read_text())


def schema_key(section: str, key: str) -> dict[str, Any]:
    """The schema of config key ``section.key``: its type, ``default``, ``enum``, description."""
    return load_schema()["properties"][section]["properties"][key]


def schema_default(section: str, key: str) -> Any:
    """The schema's default of config key ``section.key``, e.g. ``schema_default("fit", "metric")``."""
    return copy.deepcopy(schema_key(section, key)["default"])


def validate(config: Mapping[str, Any], check_files: bool = True) -> dict[str, Any]:
    """Validate a config mapping against the schema and the semantic rules; return a copy with defaults (see
    :func:`load` for ``check_files``)."""
    schema = load_schema()
    cfg = copy.deepcopy(dict(config))
    for section in ("training", "quant", "analysis", "fit"):
        cfg.setdefault(section, {})
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        raise ConfigError(_schema_error_message(errors[0]))
    _drop_null_subgrids(cfg["grid"])
    _fill_defaults(cfg, schema, schema)
    _check_models(cfg)
    _check_grid(cfg)
    _check_execution(cfg)
    if check_files:
        _check_sources(cfg)
        _check_tokenizer(cfg)
    elif cfg["data"].get("vocab_size") is None:
        raise ConfigError("data.vocab_size: required when the tokenizer file is not read")
    _check_gpu_memory(cfg)
    return cfg


def _drop_null_subgrids(grid: dict[str, Any]) -> None:
    """A null ``extra`` or ``ablation`` (an overlay switching off config.yaml's) is no such sub-grid."""
    if "extra" in grid and grid["extra"] is None:
        grid["extra"] = []
    if "ablation" in grid and grid["ablation"] is None:
        del grid["ablation"]


def _check_models(cfg: Mapping[str, Any]) -> None:
    for name, arch in cfg["models"].items():
        key = f"models.{name}"
        if arch["hidden"] % arch["heads"]:
            raise ConfigError(f"{key}: hidden {arch['hidden']} is not divisible by heads {arch['heads']}")
        if arch["heads"] % arch["kv_heads"]:
            raise ConfigError(f"{key}: heads {arch['heads']} is not divisible by kv_heads {arch['kv_heads']}")
        if (arch["hidden"] // arch["heads"]) % 2:
            raise ConfigError(f"{key}: head dimension hidden/heads = {arch['hidden'] // arch['heads']} must be even (RoPE)")


def _check_grid(cfg: Mapping[str, Any]) -> None:
    _check_cells(cfg, "grid", cfg["grid"])
    _check_fractions(cfg, "grid", cfg["grid"])
    for i, extra in enumerate(cfg["grid"]["extra"]):
        _check_cells(cfg, f"grid.extra[{i}]", extra)
        _check_fractions(cfg, f"grid.extra[{i}]", extra)
    ablation = cfg["grid"].get("ablation")
    if ablation:
        _check_cells(cfg, "grid.ablation", ablation)
        for i, override in enumerate(ablation["overrides"]):
            for base in ablation["precisions"]:
                try:
                    precision.parse(f"{base}-{override}")
                except ValueError as exc:
                    raise ConfigError(f"grid.ablation.overrides[{i}]: {exc}") from None


def _check_cells(cfg: Mapping[str, Any], key: str, grid: Mapping[str, Any]) -> None:
    """Sizes, precisions, groups and token budgets of one grid (the main grid, an extra or the ablation sub-grid)."""
    models, training = cfg["models"], cfg["training"]
    for i, size in enumerate(grid["sizes"]):
        if size not in models:
            raise ConfigError(f"{key}.sizes[{i}]: size '{size}' is not in the models table (known: {', '.join(models)})")
    for i, name in enumerate(grid["precisions"]):
        try:
            prec = precision.parse(name)
        except ValueError as exc:
            raise ConfigError(f"{key}.precisions[{i}]: {exc}") from None
        if prec.is_baseline:
            raise ConfigError(f"{key}.precisions[{i}]: '{name}' quantizes nothing; the BF16 baseline of every cell is added automatically")
        if prec.format and cfg["quant"]["lac"] == "always":
            raise ConfigError(f"{key}.precisions[{i}]: '{name}' is block-scaled {prec.format}, which takes no learnable "
                              "activation clipping (quant.lac: always)")
        for size in grid["sizes"]:
            for layer, dim in linear_inputs(models[size]).items():
                if prec.rotation and dim % prec.rotation:
                    raise ConfigError(f"{key}.precisions[{i}]: Hadamard rotation size {prec.rotation} of '{name}' does "
                                      f"not divide the {layer} input dimension {dim} of size '{size}'")
    for i, group in enumerate(grid["groups"]):
        if group == "channel":
            continue
        for size in grid["sizes"]:
            for layer, dim in linear_inputs(models[size]).items():
                if dim % group:
                    raise ConfigError(
                        f"{key}.groups[{i}]: group size {group} does not divide the {layer} input dimension {dim} of size '{size}'"
                    )
    for i, value in enumerate(grid["tokens"]):
        try:
            tokens = parse_tokens(value)
        except ValueError as exc:
            raise ConfigError(f"{key}.tokens[{i}]: {exc}") from None
        for size in grid["sizes"]:
            step = models[size].get("batch_size", training["batch_size"]) * training["seq_len"]
            if tokens < step:
                raise ConfigError(
                    f"{key}.tokens[{i}]: {tokens} tokens is less than one optimizer step of size '{size}' ({step} tokens)"
                )


def _check_fractions(cfg: Mapping[str, Any], key: str, grid: Mapping[str, Any]) -> None:
    """Every QAT fraction strictly between 0 and 1 leaves at least one step of trunk and one of QAT in each of the
    sub-grid's cells; a branch of a run on several nodes is refused (its job would be a one-node job)."""
    models, training = cfg["models"], cfg["training"]
    fractions = grid.get("qat_fractions", cfg["grid"]["qat_fractions"])
    for size in grid["sizes"]:
        if any(f < 1 for f in fractions) and run_nodes(training, size) > 1:
            raise ConfigError(f"{key}.qat_fractions: runs of size '{size}' span {run_nodes(training, size)} nodes; "
                              "fractions below 1 are trained in one-node jobs (keep [1] for this sub-grid)")
    for i, fraction in enumerate(fractions):
        if not 0 < fraction < 1:
            continue
        for size in grid["sizes"]:
            step = models[size].get("batch_size", training["batch_size"]) * training["seq_len"]
            for value in grid["tokens"]:
                steps = parse_tokens(value) // step
                k = qgrid.branch_step(fraction, steps)
                if not 0 < k < steps:
                    raise ConfigError(
                        f"{key}.qat_fractions[{i}]: {fraction} of the {steps} steps of size '{size}' at {value} tokens "
                        f"leaves {steps - k} QAT steps after a trunk of {k}; use 0, 1 or a fraction that splits them"
                    )


def _check_execution(cfg: Mapping[str, Any]) -> None:
    """Every grid size's batch splits evenly over the GPUs of a run and into micro-batches; a run of more GPUs
    than a node has takes whole nodes; a job of several runs trains on one GPU at most."""
    training = cfg["training"]
    micro = training["micro_batch_size"]
    subgrids = [cfg["grid"], *cfg["grid"]["extra"], cfg["grid"].get("ablation") or {}]
    sizes = dict.fromkeys(size for sub in subgrids for size in sub.get("sizes", []))
    if isinstance(training["gpus_per_run"], Mapping):
        for size in training["gpus_per_run"]:
            if size not in cfg["models"]:
                raise ConfigError(f"training.gpus_per_run: '{size}' is not a size of the models table")
    per_node = training["gpus_per_node"]
    for size in sizes:
        batch = cfg["models"][size].get("batch_size", training["batch_size"])
        gpus = max(1, run_gpus(training, size))
        if batch % gpus:
            raise ConfigError(f"training.gpus_per_run: batch of {batch} sequences of size '{size}' does not split over {gpus} GPUs")
        if gpus > per_node and gpus % per_node:
            raise ConfigError(f"training.gpus_per_run: {gpus} GPUs of size '{size}' are not whole nodes of "
                              f"{per_node} (training.gpus_per_node)")
        if micro is not None and (batch // gpus) % micro:
            raise ConfigError(
                f"training.micro_batch_size: {micro} does not divide the {batch // gpus} sequences per GPU of size '{size}'"
            )
        if gpus > 1 and training["runs_per_job"] > 1:
            raise ConfigError(f"training.runs_per_job: {training['runs_per_job']} runs per job cannot share "
                              f"{gpus} GPUs of size '{size}' (training.gpus_per_run); set runs_per_job to 1")


def _check_gpu_memory(cfg: Mapping[str, Any]) -> None:
    """On GPUs, every run's predicted peak fits training.gpu_memory_gb at its micro-batch and activation
    checkpointing (see qatlaw.memory)."""
    if on_gpu(cfg["training"]):
        for run in qgrid.grid_runs(cfg):
            memory.plan_run(run, cfg["data"]["vocab_size"], cfg["training"])


def _check_sources(cfg: Mapping[str, Any]) -> None:
    # imported here: their pyarrow import would slow the start of every `qatlaw` command
    from qatlaw import corpus
    from qatlaw.builtin_sources import BUILTIN_SOURCES

    for i, spec in enumerate(cfg["data"]["sources"]):
        if spec in BUILTIN_SOURCES:
            continue
        try:
            corpus.resolve_user_files(spec)
        except corpus.CorpusError:
            raise ConfigError(
                f"data.sources[{i}]: '{spec}' is not a built-in source ({', '.join(BUILTIN_SOURCES)}) "
                "and matches no file (missing corpus)"
            ) from None


def _check_tokenizer(cfg: dict[str, Any]) -> None:
    """A user tokenizer file must load and have an end-of-text token; it sets data.vocab_size. Without one,
    data.vocab_size is the size of the BPE to train."""
    from qatlaw import data  # here: the tokenizer library is only needed where a tokenizer file is configured

    spec = cfg["data"]
    if spec.get("tokenizer") is None:
        if spec.get("vocab_size") is None:
            raise ConfigError("data.vocab_size: required to train a BPE (or set data.tokenizer to a tokenizer file)")
        return
    try:
        tok = data.load_tokenizer(spec["tokenizer"], spec.get("vocab_size"), spec.get("eos_token"))
    except data.DataError as exc:
        raise ConfigError(f"data.tokenizer: {exc}") from None
    spec["vocab_size"] = data.vocab_size_of(tok)


def source_ids(cfg: Mapping[str, Any]) -> dict[str, str]:
    """Map a short id per corpus part (built-in name, or user1, user2, ...) to its spec."""
    from qatlaw.builtin_sources import BUILTIN_SOURCES  # here: as in _check_sources

    out: dict[str, str] = {}
    n_user = 0
    for spec in cfg["data"]["sources"]:
        if spec in BUILTIN_SOURCES:
            out[spec] = spec
        else:
            n_user += 1
            out[f"user{n_user}"] = spec
    return out
