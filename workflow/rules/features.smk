# The features package's rules: feature analysis of the run's SAE (top contexts, logit effects,
# histograms, task attribution) and the cross-model matching of two runs' SAE latents.

FEATURES = f"{R}/features"


rule features:
    """Top-activating contexts, logit effects, histograms and task attribution (verified by ablation) per SAE latent."""
    input:
        training=rules.train_sae.output.training,
        tokens=rules.prepare_corpus.output.tokens,
        datasets=feature_datasets_of,  # tasks of features.tasks
    output:
        features=f"{FEATURES}/features.jsonl",
        html=f"{FEATURES}/features.html",
        histograms=report(
            f"{FEATURES}/histograms.png",
            caption="../report/feature_histograms.rst",
            category="Features",
            labels={"run": "{run}", "figure": "activation histograms"},
        ),
        attribution=f"{FEATURES}/task_attribution.parquet",
        summary=f"{FEATURES}/summary.json",
    log:
        f"{R}/logs/features.log",
    benchmark:
        f"{R}/logs/features.tsv"
    conda:
        "../../envs/mechflow.yaml"
    threads: threads_of_run
    resources:
        mem_mb=mem_mb_of("features", 6000),
        runtime=runtime_of("features", 30),
    params:
        cfg=stage_cfg("features"),
        model_cfg=stage_cfg("model"),
        manifest=sae_manifest_of,
        dictionary=dictionary_dir_of("sae"),
    script:
        "../scripts/features.py"


rule feature_matching:
    """Match two models' SAE latents by activation (shared texts) and logit-effect (shared tokens) profiles, with a permutation null."""
    input:
        unpack(feature_matching_inputs_of),
    output:
        matching="results/cross_model/{pair}/features/feature_matching.json",
        summary="results/cross_model/{pair}/features/feature_matching.md",
        figure=report(
            "results/cross_model/{pair}/features/feature_matching.png",
            caption="../report/feature_matching.rst",
            category="Statistics",
            labels={"pair": "{pair}", "figure": "feature matching"},
        ),
    log:
        "results/cross_model/{pair}/logs/feature_matching.log",
    conda:
        "../../envs/mechflow.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb_of("feature_matching", 8000),
        runtime=runtime_of("feature_matching", 30),
    params:
        cfg=stage_cfg("feature_matching"),  # the pair's first run's group (the runs differ only in the model)
        model_cfg_a=pair_model_cfg("a"),
        model_cfg_b=pair_model_cfg("b"),
        corpus_cfg=stage_cfg("corpus"),  # corpus passages are shared texts
    script:
        "../scripts/feature_matching.py"
