rule circuits:
    """Minimal faithful circuit (EAP-IG ranking, exact evaluation), curve, CPR/CMD, drawing; edges where
    edge patching is defined, else nodes (`circuits.unit`; edge_scores then holds the node ranking)."""
    input:
        dataset=rules.prepare_task.output.dataset,
    output:
        circuit=f"{R}/circuits/{{task}}/circuit.json",
        edge_scores=f"{R}/circuits/{{task}}/edge_scores.parquet",
        circuit_prompts=f"{R}/circuits/{{task}}/circuit_prompts.parquet",
        curve_prompts=f"{R}/circuits/{{task}}/curve_prompts.parquet",
        dot=f"{R}/circuits/{{task}}/circuit.dot",
        figure=report(
            f"{R}/circuits/{{task}}/circuit.png",
            caption="../report/circuit.rst",
            category="Circuits",
            labels={"run": "{run}", "task": "{task}", "figure": "circuit"},
        ),
        summary=f"{R}/circuits/{{task}}/circuit.md",
    log:
        f"{R}/logs/circuits/{{task}}.log",
    benchmark:
        f"{R}/logs/circuits/{{task}}.tsv"
    conda:
        "../../envs/mechflow.yaml"
    threads: threads_of_run
    resources:
        mem_mb=mem_mb_of("circuits", 8000),
        runtime=runtime_of("circuits", 120),
    params:
        cfg=stage_cfg("circuits"),
        model_cfg=stage_cfg("model"),
    script:
        "../scripts/circuits.py"
