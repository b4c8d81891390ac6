# Feature analysis of the run's SAE: top contexts, logit effects, histograms, task attribution.

FEATURES = f"{R}/dictionaries/sae_features"


rule feature_analysis:
    """Top-activating contexts, logit effects, histograms and task attribution (verified by ablation) per SAE latent."""
    input:
        training=rules.train_sae.output.training,
        tokens=rules.prepare_corpus.output.tokens,
        datasets=feature_datasets_of,  # tasks of sae.features.tasks
    output:
        features=f"{FEATURES}/features.jsonl",
        html=f"{FEATURES}/features.html",
        histograms=f"{FEATURES}/histograms.png",
        attribution=f"{FEATURES}/task_attribution.parquet",
        summary=f"{FEATURES}/summary.json",
    log:
        f"{R}/logs/feature_analysis.log",
    benchmark:
        f"{R}/logs/feature_analysis.tsv"
    conda:
        "../../envs/mechflow.yaml"
    threads: threads_of_run
    resources:
        mem_mb=6000,
        runtime=30,
    params:
        cfg=stage_cfg("sae"),
        model_cfg=stage_cfg("model"),
        manifest=sae_manifest_of,
        dictionary=dictionary_dir_of("sae"),
    script:
        "../scripts/feature_analysis.py"
