rule prepare_corpus:
    """Tokenize the corpus into fixed-length contexts (BOS first when the model prepends it)."""
    output:
        tokens=f"{R}/corpus/tokens.parquet",
        corpus_manifest=f"{R}/corpus/corpus.json",
    params:
        cfg=stage_cfg("corpus"),
        model_cfg=stage_cfg("model"),
    log:
        f"{R}/logs/prepare_corpus.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    conda:
        "../../envs/mechflow.yaml"
    script:
        "../scripts/prepare_corpus.py"


rule harvest:
    """Run the model over the corpus; write activation shards per hook and their manifests."""
    input:
        tokens=rules.prepare_corpus.output.tokens,
    output:
        index=f"{R}/harvest/index.json",
    params:
        cfg=stage_cfg("harvest"),
        model_cfg=stage_cfg("model"),
        harvest_dir=harvest_dir_of,  # not declared as output: shards survive a kill and resume
    log:
        f"{R}/logs/harvest.log",
    benchmark:
        f"{R}/benchmarks/harvest.tsv"
    threads: threads_of_run
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        "../../envs/mechflow.yaml"
    script:
        "../scripts/harvest.py"
