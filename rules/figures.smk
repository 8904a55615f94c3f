# Figures stage: one rule per paper figure and table, drawn from Parquet outputs only (never by re-training).
# Rules are generated from qatlaw.outputs.FIGURES / qatlaw.outputs.TABLES, which name each one's inputs; the
# SPLIT_FIGURES rules exist always but are targets only for a grid with QAT fractions below 1, the EXTERNAL_FIGURES
# ones only for a run table from outside with labels of its own (common.smk).

for _figure, _keys in {**outputs.FIGURES, **outputs.SPLIT_FIGURES, **outputs.EXTERNAL_FIGURES}.items():

    rule:
        name:
            f"figure_{_figure}"
        input:
            **outputs.named_inputs(_keys),
            metrics=PLAN.run_files("metrics.parquet") if _figure == "training_curves" else [],
        output:
            png=report(
                f"results/figures/{_figure}.png",
                caption=f"../report/{_figure}.rst",
                category=outputs.figure_category(_figure),
            ),
            svg=f"results/figures/{_figure}.svg",
        params:
            figure=_figure,
            inputs=outputs.input_args(_keys),
            caption=CAPTION,
            metric=config["fit"]["metric"],
        log:
            f"results/logs/figures/{_figure}.log",
        conda:
            "../envs/analysis.yaml"
        shell:
            "qatlaw figure {params.figure} --input {params.inputs} --out {output.png} "
            "--caption {params.caption:q} --metric {params.metric} > {log} 2>&1"


for _table, _keys in outputs.TABLES.items():

    rule:
        name:
            f"table_{_table}"
        input:
            **outputs.named_inputs(_keys),
            metrics=PLAN.run_files("metrics.parquet") if _table == "gap_opening" else [],
        output:
            csv=report(f"results/tables/{_table}.csv", category="5. Tables"),
            md=f"results/tables/{_table}.md",
        params:
            table=_table,
            inputs=outputs.input_args(_keys),
            stem=subpath(output.csv, strip_suffix=".csv"),
        log:
            f"results/logs/tables/{_table}.log",
        conda:
            "../envs/analysis.yaml"
        shell:
            "qatlaw table {params.table} --input {params.inputs} --out-stem {params.stem} > {log} 2>&1"
