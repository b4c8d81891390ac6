# Exact-patching reference and the ROC AUC of every attribution method against it (issue 4).
# Two rules so that the expensive exact edge effects are cached: `edge_reference` reads only the
# exact part of the `reference` group; editing the method part (EAP-IG, positives) re-runs `reference`.


rule edge_reference:
    """Exact effect of removing each edge alone: restricted graph + stratified full-graph sample."""
    input:
        dataset=rules.prepare_task.output.dataset,
    output:
        edge_reference=f"{R}/reference/{{task}}/edge_reference.parquet",
    log:
        f"{R}/logs/edge_reference/{{task}}.log",
    benchmark:
        f"{R}/logs/edge_reference/{{task}}.tsv"
    conda:
        "../../envs/mechflow.yaml"
    threads: threads_of_run
    resources:
        mem_mb=mem_mb_of("edge_reference", 8000),
        runtime=runtime_of("edge_reference", 120),
    params:
        cfg=edge_reference_cfg_of,  # exact part only: method settings do not re-run this rule
        model_cfg=stage_cfg("model"),
    script:
        "../scripts/edge_reference.py"


rule reference:
    """ROC AUC and correlations of AP, IG (nodes) and EAP, EAP-IG (edges) against exact patching."""
    input:
        unpack(circuit_scores_of),
        dataset=rules.prepare_task.output.dataset,
        node_scores=rules.attribute.output.node_scores,
        node_prompts=rules.attribute.output.prompts,
        edge_reference=rules.edge_reference.output.edge_reference,
    output:
        auc=f"{R}/reference/{{task}}/auc.json",
        roc=report(
            f"{R}/reference/{{task}}/roc.png",
            caption="../report/reference_roc.rst",
            category="Reference",
            labels={"run": "{run}", "task": "{task}", "figure": "ROC vs exact"},
        ),
        summary=f"{R}/reference/{{task}}/reference.md",
    log:
        f"{R}/logs/reference/{{task}}.log",
    benchmark:
        f"{R}/logs/reference/{{task}}.tsv"
    conda:
        "../../envs/mechflow.yaml"
    threads: threads_of_run
    resources:
        mem_mb=mem_mb_of("reference", 8000),
        runtime=runtime_of("reference", 30),
    params:
        cfg=stage_cfg("reference"),
        model_cfg=stage_cfg("model"),
    script:
        "../scripts/reference.py"
