rule attribute:
    """Node-level attributions of a task: exact patching, AP, IG, logit lens, DLA, head types."""
    input:
        dataset=rules.prepare_task.output.dataset,
    output:
        node_scores=f"{R}/attribution/{{task}}/node_scores.parquet",
        prompts=f"{R}/attribution/{{task}}/prompts.parquet",
        head_types=f"{R}/attribution/{{task}}/head_types.parquet",
        lens=f"{R}/attribution/{{task}}/lens.parquet",
        dla=f"{R}/attribution/{{task}}/dla.parquet",
        agreement=f"{R}/attribution/{{task}}/agreement.json",
        heads_figure=report(
            f"{R}/attribution/{{task}}/head_patching.png",
            caption="../report/head_patching.rst",
            category="Attribution",
            labels={"run": "{run}", "task": "{task}", "figure": "head patching"},
        ),
        lens_figure=report(
            f"{R}/attribution/{{task}}/logit_lens.png",
            caption="../report/logit_lens.rst",
            category="Attribution",
            labels={"run": "{run}", "task": "{task}", "figure": "logit lens"},
        ),
        summary=f"{R}/attribution/{{task}}/attribution.md",
    log:
        f"{R}/logs/attribute/{{task}}.log",
    benchmark:
        f"{R}/logs/attribute/{{task}}.tsv"
    conda:
        "../../envs/mechflow.yaml"
    threads: threads_of_run
    resources:
        mem_mb=mem_mb_of("attribute", 8000),
        runtime=runtime_of("attribute", 60),
    params:
        cfg=stage_cfg("attribution"),
        model_cfg=stage_cfg("model"),
    script:
        "../scripts/attribute.py"


rule analyze:
    """Ablations (zero/mean/resample), token saliency with IG completeness, top neurons and their contexts."""
    input:
        dataset=rules.prepare_task.output.dataset,
        tokens=rules.prepare_corpus.output.tokens,
        harvest_index=neuron_harvest_of,
        causal_tracing=causal_tracing_of,
    output:
        ablations=f"{R}/attribution/{{task}}/ablations.parquet",
        ablations_figure=report(
            f"{R}/attribution/{{task}}/ablations.png",
            caption="../report/ablations.rst",
            category="Attribution",
            labels={"run": "{run}", "task": "{task}", "figure": "ablations"},
        ),
        saliency=f"{R}/attribution/{{task}}/saliency.parquet",
        saliency_figure=report(
            f"{R}/attribution/{{task}}/saliency.png",
            caption="../report/saliency.rst",
            category="Attribution",
            labels={"run": "{run}", "task": "{task}", "figure": "token saliency"},
        ),
        neurons=f"{R}/attribution/{{task}}/neurons.parquet",
        neurons_md=f"{R}/attribution/{{task}}/neurons.md",
        summary=f"{R}/attribution/{{task}}/analysis.md",
    log:
        f"{R}/logs/analyze/{{task}}.log",
    benchmark:
        f"{R}/logs/analyze/{{task}}.tsv"
    conda:
        "../../envs/mechflow.yaml"
    threads: threads_of_run
    resources:
        mem_mb=mem_mb_of("analyze", 8000),
        runtime=runtime_of("analyze", 90),
    params:
        cfg=stage_cfg("analysis"),
        model_cfg=stage_cfg("model"),
    script:
        "../scripts/analyze.py"


rule causal_trace:
    """Causal tracing (Meng et al. 2022): noise the subject, restore states per layer × position."""
    input:
        dataset=rules.prepare_task.output.dataset,
    output:
        causal_tracing=f"{R}/attribution/{{task}}/causal_tracing.parquet",
        figure=report(
            f"{R}/attribution/{{task}}/causal_tracing.png",
            caption="../report/causal_tracing.rst",
            category="Attribution",
            labels={"run": "{run}", "task": "{task}", "figure": "causal tracing"},
        ),
    log:
        f"{R}/logs/causal_trace/{{task}}.log",
    benchmark:
        f"{R}/logs/causal_trace/{{task}}.tsv"
    conda:
        "../../envs/mechflow.yaml"
    threads: threads_of_run
    resources:
        mem_mb=mem_mb_of("causal_trace", 8000),
        runtime=runtime_of("causal_trace", 60),
    params:
        cfg=stage_cfg("causal_tracing"),
        model_cfg=stage_cfg("model"),
    script:
        "../scripts/causal_trace.py"
