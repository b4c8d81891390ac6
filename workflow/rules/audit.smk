# The black-box audit (rule audit, opt in with audit.enabled): probes of a model behind an OpenAI-compatible
# endpoint, with the run's white-box tasks asked through the same API for a side by side.

AUDIT = f"{R}/audit"


rule audit:
    """Probe a model behind an OpenAI-compatible endpoint: decisions over attribute values, paraphrases, refusals, the run's tasks."""
    input:
        unpack(audit_task_files_of),
    output:
        summary=f"{AUDIT}/summary.json",
        responses=f"{AUDIT}/responses.jsonl",
        scores=f"{AUDIT}/scores.jsonl",
        figure=report(
            f"{AUDIT}/audit.png",
            caption="../report/audit.rst",
            category="Black-box audit",
            labels={"run": "{run}", "figure": "audit metrics"},
        ),
    log:
        f"{R}/logs/audit.log",
    benchmark:
        f"{R}/logs/audit.tsv"
    conda:
        "../../envs/mechflow.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=120,
    params:
        cfg=stage_cfg("audit"),
        model_cfg=stage_cfg("model"),
    script:
        "../scripts/audit.py"
