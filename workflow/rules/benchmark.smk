rule benchmark:
    """ACDC vs EAP, EAP-IG, our circuit search and exhaustive patching on one restricted graph."""
    input:
        dataset=rules.prepare_task.output.dataset,
    output:
        table=f"{R}/benchmark/{{task}}/table.csv",
        table_tex=f"{R}/benchmark/{{task}}/table.tex",
        timings=f"{R}/benchmark/{{task}}/timings.json",
        summary=f"{R}/benchmark/{{task}}/benchmark.md",
        roc=report(
            f"{R}/benchmark/{{task}}/roc.png",
            caption="../report/benchmark_roc.rst",
            category="Benchmark",
            labels={"run": "{run}", "task": "{task}", "figure": "ROC"},
        ),
        curves=report(
            f"{R}/benchmark/{{task}}/faithfulness_curves.png",
            caption="../report/faithfulness_curves.rst",
            category="Benchmark",
            labels={"run": "{run}", "task": "{task}", "figure": "faithfulness"},
        ),
    log:
        f"{R}/logs/benchmark/{{task}}.log",
    conda:
        "../../envs/mechflow.yaml"
    threads: threads_of_run
    resources:
        mem_mb=mem_mb_of("benchmark", 12000),
        runtime=runtime_of("benchmark", 240),
    params:
        cfg=stage_cfg("benchmark"),  # without BenchmarkConfig.SELECTION_KEYS: no rerun
        model_cfg=stage_cfg("model"),
    script:
        "../scripts/benchmark.py"
