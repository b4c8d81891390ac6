rule summarize:
    """One table of every stage's headline numbers (each naming its source file), and one figure."""
    input:
        baselines=baselines_of,
        harvest_index=rules.harvest.output.index,
        model_card=rules.model_card.output.model_card,
        results=summary_results_of,
    output:
        table=report(
            f"{R}/summary/summary.csv",
            caption="../report/summary_table.rst",
            category="Summary",
            labels={"run": "{run}", "file": "table"},
        ),
        figure=report(
            f"{R}/summary/activation_norms.png",
            caption="../report/activation_norms.rst",
            category="Summary",
            labels={"run": "{run}", "file": "figure"},
        ),
    log:
        f"{R}/logs/summarize.log",
    conda:
        "../../envs/mechflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    params:
        cfg=stage_cfg("summary"),
    script:
        "../scripts/summarize.py"


rule run_manifest:
    """Close the run: hashes of every input and output, versions, git commit, times."""
    input:
        resolved_config=rules.resolve_config.output.resolved_config,
        model_card=rules.model_card.output.model_card,
        datasets=datasets_of,
        baselines=baselines_of,
        tokens=rules.prepare_corpus.output.tokens,
        harvest_index=rules.harvest.output.index,
        table=rules.summarize.output.table,
        figure=rules.summarize.output.figure,
        dictionary_metrics=dictionary_metrics_of,
        dictionary_figures=dictionary_figures_of,
        circuit_outputs=circuit_outputs_of,
        statistics=statistics_of,
        benchmarks=benchmarks_of,
        feature_outputs=feature_outputs_of,
        reference_outputs=reference_outputs_of,
        analysis_outputs=analysis_outputs_of,
        graph_outputs=graph_outputs_of,
        cross_model_outputs=cross_model_outputs_of,
        steer_outputs=steer_outputs_of,
        audit_outputs=audit_outputs_of,
    output:
        run_manifest=f"{R}/run_manifest.json",
    log:
        f"{R}/logs/run_manifest.log",
    localrule: True
    conda:
        "../../envs/mechflow.yaml"
    params:
        run_cfg=run_cfg,
    script:
        "../scripts/run_manifest.py"
