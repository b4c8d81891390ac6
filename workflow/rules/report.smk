# The report stage: the run's paper figures and tables (`snakemake figures`) and its Annex IV
# technical documentation (report.pdf / .json / .md), the last job of every run.


rule rulegraph:
    """The run's rule graph (DOT, from snakemake --rulegraph), drawn in the report's reproducibility appendix."""
    input:
        resolved_config=rules.resolve_config.output.resolved_config,
    output:
        rulegraph=f"{R}/report/rulegraph.dot",
    log:
        f"{R}/logs/rulegraph.log",
    localrule: True
    conda:
        "../../envs/mechflow.yaml"
    params:
        overrides=run_overrides,
    script:
        "../scripts/rulegraph.py"


rule paper_figures:
    """The run's paper figures (PDF + PNG, one style) and tables (CSV + LaTeX), from the report's numbers."""
    input:
        run_manifest=rules.run_manifest.output.run_manifest,
        rulegraph=rules.rulegraph.output.rulegraph,
    output:
        png=[
            report(
                f"{R}/figures/{name}.png",
                caption="../report/paper_figure.rst",
                category="Paper figures",
                labels={"run": "{run}", "figure": name},
            )
            for name in PAPER_FIGURES
        ],
        pdf=[f"{R}/figures/{name}.pdf" for name in PAPER_FIGURES],
        tables=[f"{R}/tables/{name}.{ext}" for name in PAPER_TABLES for ext in ("csv", "tex")],
    log:
        f"{R}/logs/paper_figures.log",
    conda:
        "../../envs/mechflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        cfg=stage_cfg("report"),
    script:
        "../scripts/paper_figures.py"


rule report:
    """Annex IV-structured technical documentation of the run: report.pdf, report.json, report.md."""
    input:
        run_manifest=rules.run_manifest.output.run_manifest,
        resolved_config=rules.resolve_config.output.resolved_config,
        provider=provider_file_of,
        paper_figures=rules.paper_figures.output.png,
    output:
        report_pdf=report(
            f"{R}/report/report.pdf",
            caption="../report/annex_iv.rst",
            category="Annex IV report",
            labels={"run": "{run}", "file": "report.pdf"},
        ),
        report_json=f"{R}/report/report.json",
        report_md=f"{R}/report/report.md",
    log:
        f"{R}/logs/report.log",
    conda:
        "../../envs/mechflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        cfg=stage_cfg("report"),
        overrides=run_overrides,
    script:
        "../scripts/report.py"


rule figures:
    """Target: `snakemake figures` regenerates every run's paper figures and tables (and what they need)."""
    input:
        paper_figure_targets,
    localrule: True
