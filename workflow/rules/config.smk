rule resolve_config:
    """Write the run's resolved Hydra config (the first output of every run)."""
    output:
        resolved_config=f"{R}/config.resolved.yaml",
    log:
        f"{R}/logs/resolve_config.log",
    localrule: True
    conda:
        "../../envs/mechflow.yaml"
    params:
        run_cfg=run_cfg,
    script:
        "../scripts/resolve_config.py"


rule model_card:
    """Load the run's model once and record what was loaded (sizes, weight file sha256)."""
    output:
        model_card=f"{R}/model_card.json",
    log:
        f"{R}/logs/model_card.log",
    conda:
        "../../envs/mechflow.yaml"
    threads: threads_of_run
    resources:
        mem_mb=mem_mb_of("model_card", 6000),
        runtime=runtime_of("model_card", 15),
    params:
        model_cfg=stage_cfg("model"),
    script:
        "../scripts/model_card.py"
