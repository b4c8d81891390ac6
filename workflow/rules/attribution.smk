rule attribute:
    """Node-level attributions of a task: exact patching, AP, IG, logit lens, DLA, head types."""
    input:
        dataset=rules.prepare_task.output.dataset,
    output:
        node_scores=f"{R}/circuits/{{task}}/node_scores.parquet",
        prompts=f"{R}/circuits/{{task}}/prompts.parquet",
        head_types=f"{R}/circuits/{{task}}/head_types.parquet",
        lens=f"{R}/circuits/{{task}}/lens.parquet",
        dla=f"{R}/circuits/{{task}}/dla.parquet",
        agreement=f"{R}/circuits/{{task}}/agreement.json",
        heads_figure=report(f"{R}/circuits/{{task}}/head_patching.png", category="Attribution", labels={"run": "{run}", "task": "{task}", "figure": "head patching"}),
        lens_figure=report(f"{R}/circuits/{{task}}/logit_lens.png", category="Attribution", labels={"run": "{run}", "task": "{task}", "figure": "logit lens"}),
        summary=f"{R}/circuits/{{task}}/attribution.md",
    params:
        cfg=stage_cfg("attribution"),
        model_cfg=stage_cfg("model"),
    log:
        f"{R}/logs/attribute/{{task}}.log",
    benchmark:
        f"{R}/benchmarks/attribute/{{task}}.tsv"
    threads: threads_of_run
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../../envs/mechflow.yaml"
    script:
        "../scripts/attribute.py"
