# Summary table (solver x NFE x metrics) and plots: quality vs NFE, loss and reward curves, image grids.
# The inputs tell Snakemake what must exist; `epd report` reads them from the results folder.
rule report:
    input:
        evals=expand(f"{RESULTS}/eval/{{name}}/summary.json", name=SAMPLED),
        samples=expand(f"{RESULTS}/samples/{{name}}", name=SAMPLED),
        loss=expand(f"{RESULTS}/tables/epd-nfe{{nfe}}.loss.csv", nfe=config["distill"]["nfe"]),
        reward=expand(f"{RESULTS}/tables/rdpo-nfe{{nfe}}.metrics.csv", nfe=config["distill"]["nfe"]),
    output:
        multiext(f"{REPORT}/", "summary.md", "summary.csv", "quality_vs_nfe.png", "curves.png", "grids.png"),
    params:
        results=RESULTS,
        out=REPORT,
        parent=PARENT_RUN,
        tracking=tracking("report"),
    localrule: True
    shell:
        "epd report --results {params.results} --out {params.out} {params.tracking} "
        "&& epd pipeline-run end {params.parent}"
