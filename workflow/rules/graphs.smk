# The transcoder set (one per-layer transcoder per MLP) and the attribution graphs built on it
# (opt in: graph.enabled). Harvest groups are temp(): deleted once their layers are trained.

TSET = f"{R}/dictionaries/transcoder_set"
GRAPHS = f"{R}/graphs/{{task}}"


rule harvest_layers:
    """Harvest the MLP input and output of one group of layers (one forward pass up to its last layer)."""
    input:
        tokens=rules.prepare_corpus.output.tokens,
    output:
        harvest_dir=temp(directory(f"{R}/harvest_layers/group_{{group}}")),
    log:
        f"{R}/logs/harvest_layers/group_{{group}}.log",
    benchmark:
        f"{R}/logs/harvest_layers/group_{{group}}.tsv"
    conda:
        "../../envs/mechflow.yaml"
    threads: threads_of_run
    resources:
        mem_mb=mem_mb_of("harvest_layers"),
        runtime=runtime_of("harvest_layers"),
    params:
        cfg=stage_cfg("transcoder_set"),
        harvest_cfg=stage_cfg("harvest"),
        model_cfg=stage_cfg("model"),
    script:
        "../scripts/harvest_layers.py"


rule train_layer_transcoder:
    """Train one layer's transcoder of the set on its harvest group's shards (held-out metrics included)."""
    input:
        harvest_dir=harvest_group_of,
    output:
        training=f"{TSET}/layer_{{layer}}/training.json",
        curves=report(
            f"{TSET}/layer_{{layer}}/training_curves.png",
            caption="../report/training_curves.rst",
            category="Transcoder set",
            subcategory="Training curves",
            labels={"run": "{run}", "layer": "{layer}", "figure": "training curves"},
        ),
    log:
        f"{R}/logs/train_layer_transcoder/layer_{{layer}}.log",
    benchmark:
        f"{R}/logs/train_layer_transcoder/layer_{{layer}}.tsv"
    conda:
        "../../envs/mechflow.yaml"
    threads: threads_of_run
    resources:
        mem_mb=mem_mb_of("train_layer_transcoder"),
        runtime=runtime_of("train_layer_transcoder"),
        gpu=gpu_of("transcoder_set"),
    params:
        cfg=stage_cfg("transcoder_set"),
        model_cfg=stage_cfg("model"),
        wandb_cfg=stage_cfg("wandb"),
        out_dir=layer_transcoder_dir_of,
    script:
        "../scripts/train_layer_transcoder.py"


rule transcoder_set:
    """Per-layer table and figure, the whole model with every MLP replaced, and the circuit-tracer export."""
    input:
        trainings=set_trainings_of,
        tokens=rules.prepare_corpus.output.tokens,
    output:
        summary=f"{TSET}/set.json",
        table=f"{TSET}/per_layer.csv",
        figure=report(
            f"{TSET}/per_layer.png",
            caption="../report/per_layer.rst",
            category="Transcoder set",
            labels={"run": "{run}", "figure": "per layer"},
        ),
        circuit_tracer=directory(f"{TSET}/circuit_tracer"),
    log:
        f"{R}/logs/transcoder_set.log",
    conda:
        "../../envs/mechflow.yaml"
    threads: threads_of_run
    resources:
        mem_mb=mem_mb_of("transcoder_set", 6000),
        runtime=runtime_of("transcoder_set", 30),
    params:
        cfg=stage_cfg("transcoder_set"),
        harvest_cfg=stage_cfg("harvest"),
        model_cfg=stage_cfg("model"),
    script:
        "../scripts/transcoder_set.py"


rule transcoder_features:
    """The feature analysis on the transcoder set: every feature's top corpus contexts, stats, records and page."""
    input:
        transcoder_set=rules.transcoder_set.output.summary,
        tokens=rules.prepare_corpus.output.tokens,
    output:
        top_contexts=f"{TSET}/features/top_contexts.parquet",
        feature_stats=f"{TSET}/features/feature_stats.parquet",
        features=f"{TSET}/features/features.jsonl",
        html=f"{TSET}/features/features.html",
        summary=f"{TSET}/features/summary.json",
    log:
        f"{R}/logs/transcoder_features.log",
    benchmark:
        f"{R}/logs/transcoder_features.tsv"
    conda:
        "../../envs/mechflow.yaml"
    threads: threads_of_run
    resources:
        mem_mb=mem_mb_of("transcoder_features", 6000),
        runtime=runtime_of("transcoder_features", 30),
    params:
        cfg=stage_cfg("features"),
        model_cfg=stage_cfg("model"),
    script:
        "../scripts/transcoder_features.py"


rule attribution_graph:
    """The attribution graph of one task prompt: JSON, viewer, figures, scores and validation by intervention."""
    input:
        transcoder_set=rules.transcoder_set.output.summary,
        dataset=f"{R}/tasks/{{task}}/dataset.jsonl",
        tokens=rules.prepare_corpus.output.tokens,
        top_contexts=rules.transcoder_features.output.top_contexts,
    output:
        graph=f"{GRAPHS}/p{{prompt}}/graph.safetensors",
        summary=f"{GRAPHS}/p{{prompt}}/graph.json",
        neuronpedia=f"{GRAPHS}/{{task}}-p{{prompt}}.json",
        viewer=f"{GRAPHS}/p{{prompt}}/viewer.html",
        figure=report(
            f"{GRAPHS}/p{{prompt}}/graph.png",
            caption="../report/graph.rst",
            category="Attribution graphs",
            labels={"run": "{run}", "task": "{task}", "prompt": "{prompt}", "figure": "graph"},
        ),
        validation=f"{GRAPHS}/p{{prompt}}/validation.parquet",
        validation_figure=report(
            f"{GRAPHS}/p{{prompt}}/validation.png",
            caption="../report/graph_validation.rst",
            category="Attribution graphs",
            labels={"run": "{run}", "task": "{task}", "prompt": "{prompt}", "figure": "validation"},
        ),
        supernodes_file=f"{GRAPHS}/p{{prompt}}/supernodes.json",
    log:
        f"{R}/logs/attribution_graph/{{task}}_p{{prompt}}.log",
    benchmark:
        f"{R}/logs/attribution_graph/{{task}}_p{{prompt}}.tsv"
    conda:
        "../../envs/mechflow.yaml"
    threads: threads_of_run
    resources:
        mem_mb=mem_mb_of("attribution_graph", 8000),
        runtime=runtime_of("attribution_graph", 60),
    params:
        cfg=stage_cfg("graph"),
        model_cfg=stage_cfg("model"),
    script:
        "../scripts/attribution_graph.py"


rule graphs_summary:
    """A task's graphs.md and the frontend's graph-metadata.json index."""
    input:
        unpack(graph_files_of),
    output:
        markdown=f"{GRAPHS}/graphs.md",
        metadata=f"{GRAPHS}/graph-metadata.json",
    log:
        f"{R}/logs/graphs_summary/{{task}}.log",
    localrule: True
    conda:
        "../../envs/mechflow.yaml"
    params:
        cfg=stage_cfg("graph"),
    script:
        "../scripts/graphs_summary.py"
