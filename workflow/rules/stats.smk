rule stats:
    """Bootstrap CIs (percentile, BCa), ranking stability (Kendall τ-b, top-k Jaccard) of a task."""
    input:
        unpack(statistics_inputs_of),
    output:
        bootstrap=f"{R}/stats/{{task}}/bootstrap.parquet",
        bootstrap_csv=f"{R}/stats/{{task}}/bootstrap.csv",
        stability=f"{R}/stats/{{task}}/stability.json",
        stability_methods=f"{R}/stats/{{task}}/stability_methods.csv",
        summary=f"{R}/stats/{{task}}/statistics.md",
        forest=report(
            f"{R}/stats/{{task}}/forest.png",
            caption="../report/forest.rst",
            category="Statistics",
            labels={"run": "{run}", "task": "{task}", "figure": "CIs"},
        ),
        tau_heatmap=report(
            f"{R}/stats/{{task}}/tau_heatmap.png",
            caption="../report/tau_heatmap.rst",
            category="Statistics",
            labels={"run": "{run}", "task": "{task}", "figure": "Kendall tau"},
        ),
    log:
        f"{R}/logs/stats/{{task}}.log",
    conda:
        "../../envs/mechflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        cfg=stage_cfg("stats"),
    script:
        "../scripts/stats.py"


rule cross_model:
    """FCAS alignment of two models' top components with a permutation null, and CKA by depth."""
    input:
        unpack(cross_model_inputs_of),
    output:
        fcas="results/cross_model/{pair}/{task}/fcas.json",
        fcas_null=report(
            "results/cross_model/{pair}/{task}/fcas_null.png",
            caption="../report/fcas_null.rst",
            category="Statistics",
            labels={"pair": "{pair}", "task": "{task}", "figure": "FCAS null"},
        ),
        summary="results/cross_model/{pair}/{task}/cross_model.md",
        # CKA always runs here: the rule passes both model configs
        cka="results/cross_model/{pair}/{task}/cka.json",
        cka_table="results/cross_model/{pair}/{task}/cka.parquet",
        cka_csv="results/cross_model/{pair}/{task}/cka.csv",
        cka_figure=report(
            "results/cross_model/{pair}/{task}/cka.png",
            caption="../report/cka.rst",
            category="Statistics",
            labels={"pair": "{pair}", "task": "{task}", "figure": "CKA"},
        ),
    log:
        "results/cross_model/{pair}/logs/{task}.log",
    conda:
        "../../envs/mechflow.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb_of("cross_model", 12000),
        runtime=runtime_of("cross_model", 30),
    params:
        cfg=stage_cfg("stats"),
        model_cfg_a=pair_model_cfg("a"),
        model_cfg_b=pair_model_cfg("b"),
    script:
        "../scripts/cross_model.py"
