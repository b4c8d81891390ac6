rule train_sae:
    """Train a sparse autoencoder with SAELens' trainer, streaming the harvested Parquet shards."""
    input:
        harvest_index=rules.harvest.output.index,
    output:
        training=f"{R}/dictionaries/sae/training.json",
        curves=report(
            f"{R}/dictionaries/sae/training_curves.png",
            caption="../report/training_curves.rst",
            category="Dictionaries",
            labels={"run": "{run}", "dictionary": "SAE", "figure": "training curves"},
        ),
    log:
        f"{R}/logs/train_sae.log",
    benchmark:
        f"{R}/logs/train_sae.tsv"
    conda:
        "../../envs/mechflow.yaml"
    threads: threads_of_run
    resources:
        mem_mb=mem_mb_of("train_sae"),
        runtime=runtime_of("train_sae"),
        gpu=gpu_of("sae"),
    params:
        cfg=stage_cfg("sae"),
        model_cfg=stage_cfg("model"),
        wandb_cfg=stage_cfg("wandb"),
        manifest=sae_manifest_of,
        out_dir=dictionary_dir_of("sae"),  # the whole SAELens folder is swapped into place atomically
    script:
        "../scripts/train_sae.py"


rule evaluate_sae:
    """Held-out EV (outliers excluded and included), L0, dead/dense latents, spliced CE and KL."""
    input:
        training=rules.train_sae.output.training,
        tokens=rules.prepare_corpus.output.tokens,
    output:
        metrics=f"{R}/dictionaries/sae_metrics.json",
    log:
        f"{R}/logs/evaluate_sae.log",
    conda:
        "../../envs/mechflow.yaml"
    threads: threads_of_run
    resources:
        mem_mb=mem_mb_of("evaluate_sae", 6000),
        runtime=runtime_of("evaluate_sae", 30),
    params:
        cfg=stage_cfg("sae"),
        model_cfg=stage_cfg("model"),
        manifest=sae_manifest_of,
        dictionary=dictionary_dir_of("sae"),
    script:
        "../scripts/evaluate_sae.py"


rule train_transcoder:
    """Train a JumpReLU transcoder (per-layer, skip or cross-layer) on harvested MLP in/out pairs."""
    input:
        harvest_index=rules.harvest.output.index,
    output:
        training=f"{R}/dictionaries/transcoder/training.json",
        curves=report(
            f"{R}/dictionaries/transcoder/training_curves.png",
            caption="../report/training_curves.rst",
            category="Dictionaries",
            labels={"run": "{run}", "dictionary": "transcoder", "figure": "training curves"},
        ),
    log:
        f"{R}/logs/train_transcoder.log",
    benchmark:
        f"{R}/logs/train_transcoder.tsv"
    conda:
        "../../envs/mechflow.yaml"
    threads: threads_of_run
    resources:
        mem_mb=mem_mb_of("train_transcoder"),
        runtime=runtime_of("train_transcoder"),
        gpu=gpu_of("transcoder"),
    params:
        cfg=stage_cfg("transcoder"),
        model_cfg=stage_cfg("model"),
        wandb_cfg=stage_cfg("wandb"),
        manifests=transcoder_manifests_of,
        out_dir=dictionary_dir_of("transcoder"),
    script:
        "../scripts/train_transcoder.py"


rule evaluate_transcoder:
    """Held-out FVU, L0, dead latents, and CE/KL with the transcoder replacing the MLP."""
    input:
        training=rules.train_transcoder.output.training,
        tokens=rules.prepare_corpus.output.tokens,
    output:
        metrics=f"{R}/dictionaries/transcoder_metrics.json",
    log:
        f"{R}/logs/evaluate_transcoder.log",
    conda:
        "../../envs/mechflow.yaml"
    threads: threads_of_run
    resources:
        mem_mb=mem_mb_of("evaluate_transcoder", 6000),
        runtime=runtime_of("evaluate_transcoder", 30),
    params:
        cfg=stage_cfg("transcoder"),
        model_cfg=stage_cfg("model"),
        manifests=transcoder_manifests_of,
        dictionary=dictionary_dir_of("transcoder"),
    script:
        "../scripts/evaluate_transcoder.py"
