rule prepare_corpus:
    """Tokenize the corpus into fixed-length contexts (BOS first when the model prepends it)."""
    output:
        tokens=f"{R}/corpus/tokens.parquet",
        corpus_manifest=f"{R}/corpus/corpus.json",
    log:
        f"{R}/logs/prepare_corpus.log",
    conda:
        "../../envs/mechflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        cfg=stage_cfg("corpus"),
        model_cfg=stage_cfg("model"),
    script:
        "../scripts/prepare_corpus.py"


rule harvest:
    """Run the model over the corpus; write activation shards per hook and their manifests."""
    input:
        tokens=rules.prepare_corpus.output.tokens,
    output:
        index=f"{R}/harvest/index.json",
    log:
        f"{R}/logs/harvest.log",
    benchmark:
        f"{R}/logs/harvest.tsv"
    conda:
        "../../envs/mechflow.yaml"
    threads: threads_of_run
    resources:
        mem_mb=mem_mb_of("harvest"),
        runtime=runtime_of("harvest"),
    params:
        cfg=stage_cfg("harvest"),
        model_cfg=stage_cfg("model"),
        harvest_dir=harvest_dir_of,  # not declared as output: shards survive a kill and resume
    script:
        "../scripts/harvest.py"
