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


rule circuit:
    """Minimal faithful edge circuit (EAP-IG ranking, exact evaluation), curve, CPR/CMD, drawing."""
    input:
        dataset=rules.prepare_task.output.dataset,
    output:
        circuit=f"{R}/circuits/{{task}}/circuit.json",
        edge_scores=f"{R}/circuits/{{task}}/edge_scores.parquet",
        circuit_prompts=f"{R}/circuits/{{task}}/circuit_prompts.parquet",
        curve_prompts=f"{R}/circuits/{{task}}/curve_prompts.parquet",
        dot=f"{R}/circuits/{{task}}/circuit.dot",
        figure=report(f"{R}/circuits/{{task}}/circuit.png", category="Circuits", labels={"run": "{run}", "task": "{task}", "figure": "circuit"}),
        summary=f"{R}/circuits/{{task}}/circuit.md",
    params:
        cfg=stage_cfg("circuit"),
        model_cfg=stage_cfg("model"),
    log:
        f"{R}/logs/circuit/{{task}}.log",
    benchmark:
        f"{R}/benchmarks/circuit/{{task}}.tsv"
    threads: threads_of_run
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        "../../envs/mechflow.yaml"
    script:
        "../scripts/circuit.py"
