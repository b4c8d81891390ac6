rule prepare_task:
    """Build a task's clean/corrupted prompt pairs for the run's tokenizer."""
    input:
        user_file=task_input_file,  # a JSONL task's file: editing it re-runs the task
    output:
        dataset=f"{R}/tasks/{{task}}/dataset.jsonl",
    log:
        f"{R}/logs/prepare_task/{{task}}.log",
    conda:
        "../../envs/mechflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        cfg=task_cfg,
        model_cfg=stage_cfg("model"),
    script:
        "../scripts/prepare_task.py"


rule evaluate_task:
    """Baseline clean/corrupted metric and accuracy of the model on a task (says if it fails)."""
    input:
        dataset=rules.prepare_task.output.dataset,
    output:
        baseline=f"{R}/tasks/{{task}}/baseline.json",
    log:
        f"{R}/logs/evaluate_task/{{task}}.log",
    benchmark:
        f"{R}/logs/evaluate_task/{{task}}.tsv"
    conda:
        "../../envs/mechflow.yaml"
    threads: threads_of_run
    resources:
        mem_mb=mem_mb_of("evaluate_task", 6000),
        runtime=runtime_of("evaluate_task", 20),
    params:
        cfg=task_cfg,
        model_cfg=stage_cfg("model"),
    script:
        "../scripts/evaluate_task.py"
