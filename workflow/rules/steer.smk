# Interventions (rule steer, one job per task of steer.tasks): contrast directions per layer, feature
# clamps through the run's dictionaries, strength sweeps with side effects, controls and records.

STEER = f"{R}/steer/{{task}}"


rule steer:
    """Learn a contrast direction per layer, sweep its strength and the task's top SAE latents in the real model, with side effects and controls."""
    input:
        dataset=f"{R}/tasks/{{task}}/dataset.jsonl",
        datasets=datasets_of,  # the other tasks' metrics are side effects
        tokens=rules.prepare_corpus.output.tokens,
        sae_training=steer_sae_of,
        transcoder_training=steer_transcoder_of,
    output:
        summary=f"{STEER}/summary.json",
        interventions=f"{STEER}/interventions.jsonl",
        activations=f"{STEER}/activations.jsonl",
        directions=f"{STEER}/directions.safetensors",
        generations=f"{STEER}/generations.md",
        layers_figure=report(
            f"{STEER}/layers.png",
            caption="../report/steer_layers.rst",
            category="Steering",
            labels={"run": "{run}", "task": "{task}", "figure": "contrast direction per layer"},
        ),
        sweep_figure=report(
            f"{STEER}/sweep.png",
            caption="../report/steer_sweep.rst",
            category="Steering",
            labels={"run": "{run}", "task": "{task}", "figure": "strength sweep"},
        ),
    log:
        f"{R}/logs/steer/{{task}}.log",
    benchmark:
        f"{R}/logs/steer/{{task}}.tsv"
    conda:
        "../../envs/mechflow.yaml"
    threads: threads_of_run
    resources:
        mem_mb=mem_mb_of("steer", 6000),
        runtime=runtime_of("steer", 30),
    params:
        cfg=stage_cfg("steer"),
        model_cfg=stage_cfg("model"),
    script:
        "../scripts/steer.py"
